#!/usr/bin/env bash
# Rewrites the golden wire bytes (tests/golden/*.hex) from the message types as they are
# now. Only for a deliberate change of the wire contract: say in the commit what changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PCB_WRITE_GOLDEN=1 cargo test -p pcb-schemas --test golden every_schema_encodes_to_its_golden_bytes
git diff --stat -- tests/golden
