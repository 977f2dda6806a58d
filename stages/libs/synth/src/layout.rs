//! Random but design-rule-clean board layouts: pours, pad rows, buses and octilinear traces.
//!
//! Every feature is placed only if its shape grown by the board's clearance touches no copper of
//! another net, so the golden template never contains accidental shorts; this is what lets the
//! defect painter treat every gap between nets as a place where a "short" can be drawn.

use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::geom::{dir8, for_each_run, Shape, P};

/// Owner value of background pixels.
pub(crate) const NO_OWNER: u16 = 0;

/// Beyond this many features the `u16` owner map would overflow, so layout stops adding.
const MAX_FEATURES: usize = 60_000;

/// What a feature is, as far as defect placement cares.
#[derive(Clone, Debug)]
pub(crate) enum FeatKind {
    /// One straight piece of a trace, `w` wide, from `a` to `b`.
    Seg {
        /// Start of the centre line.
        a: P,
        /// End of the centre line.
        b: P,
        /// Copper width.
        w: f64,
    },
    /// A solid pad or pour: large copper where a pin-hole can sit.
    Solid,
}

/// One painted feature of the template.
#[derive(Clone, Debug)]
pub(crate) struct Feature {
    /// Kind-specific geometry.
    pub kind: FeatKind,
    /// Bounding box `(x0, y0, x1, y1)` of the painted copper, in continuous coordinates.
    pub bounds: (f64, f64, f64, f64),
}

/// Per-board design rules, drawn once so a board looks like one consistent technology.
#[derive(Clone, Copy, Debug)]
struct Style {
    /// Minimum copper-to-copper gap between different nets.
    clear: f64,
    /// Width of signal traces squeezed between pads.
    w_thin: f64,
    /// Width of ordinary signal traces.
    w_norm: f64,
    /// Width of power traces.
    w_wide: f64,
    /// Smallest pad size.
    pad_min: f64,
    /// Largest pad size.
    pad_max: f64,
}

impl Style {
    /// Draws a style; ranges are DeepPCB-like at its ~48 px/mm.
    fn random(rng: &mut ChaCha8Rng) -> Self {
        let clear = rng.gen_range(8.0..13.0);
        let w_thin = rng.gen_range(7.0..10.0);
        let w_norm = rng.gen_range(11.0..17.0);
        let w_wide = rng.gen_range(22.0..40.0);
        let pad_min = rng.gen_range(28.0..40.0);
        let pad_max = pad_min + rng.gen_range(10.0..40.0);
        Self {
            clear,
            w_thin,
            w_norm,
            w_wide,
            pad_min,
            pad_max,
        }
    }

    /// Width for a new trace, mostly ordinary, sometimes thin or wide.
    fn trace_width(&self, rng: &mut ChaCha8Rng) -> f64 {
        match rng.gen_range(0..20) {
            0..=5 => self.w_thin,
            6..=16 => self.w_norm,
            _ => self.w_wide,
        }
    }
}

/// A connection point a trace may start or end on.
#[derive(Clone, Copy, Debug)]
struct Anchor {
    /// Where the trace's centre line ends.
    at: P,
    /// The pad or pour the point belongs to.
    feature: u16,
}

/// Area where a new trace may touch copper of one net. Limiting same-net contact to the
/// anchors keeps traces of one net from crossing each other in mid-air, which real boards
/// avoid and which would look like a short.
#[derive(Clone, Copy, Debug)]
struct Zone {
    /// The net that may be touched.
    net: u32,
    /// Left edge.
    x0: f64,
    /// Top edge.
    y0: f64,
    /// Right edge.
    x1: f64,
    /// Bottom edge.
    y1: f64,
}

impl Zone {
    /// Whether copper of `net` at pixel `(x, y)` may be touched.
    fn admits(&self, net: u32, x: usize, y: usize) -> bool {
        let (x, y) = (x as f64, y as f64);
        net == self.net && self.x0 <= x && x <= self.x1 && self.y0 <= y && y <= self.y1
    }
}

/// A finished template layout plus the bookkeeping the defect painter needs.
pub(crate) struct Layout {
    /// Side length in pixels.
    pub size: usize,
    /// Feature id owning each pixel (row-major), [`NO_OWNER`] for background.
    pub owner: Vec<u16>,
    /// Features by id; index 0 is a placeholder for the background.
    pub feats: Vec<Feature>,
    /// Net of each feature id, kept fully resolved (no union-find chains).
    pub net: Vec<u32>,
    /// Drill holes (centre, radius), punched after all copper is placed.
    holes: Vec<(P, f64)>,
    /// Design rules of this board.
    style: Style,
}

impl Layout {
    /// Draws a complete random layout on a `size` x `size` canvas.
    pub(crate) fn generate(size: usize, rng: &mut ChaCha8Rng) -> Layout {
        let style = Style::random(rng);
        let mut l = Layout {
            size,
            owner: vec![NO_OWNER; size * size],
            feats: vec![Feature {
                kind: FeatKind::Solid,
                bounds: (0.0, 0.0, 0.0, 0.0),
            }],
            net: vec![0],
            holes: Vec::new(),
            style,
        };
        // Feature counts scale with area so large canvases are as busy as DeepPCB's 640 crops.
        let area = (size * size) as f64 / (640.0 * 640.0);
        let scaled = |n: usize| -> usize { ((n as f64) * area).round() as usize };

        let mut anchors = Vec::new();
        let pours = scaled(rng.gen_range(0..=2));
        for _ in 0..pours {
            l.place_pour(rng, &mut anchors);
        }
        let comps = scaled(rng.gen_range(3..=8)).max(1);
        for _ in 0..comps {
            l.place_component(rng, &mut anchors);
        }
        let buses = scaled(rng.gen_range(0..=3));
        for _ in 0..buses {
            l.place_bus(rng);
        }
        let mut order: Vec<usize> = (0..anchors.len()).collect();
        order.shuffle(rng);
        for &i in &order {
            let n = rng.gen_range(1..=3);
            for _ in 0..n {
                if rng.gen_bool(0.6) {
                    l.route_between(rng, &anchors, i);
                } else {
                    l.route_to_edge(rng, anchors[i]);
                }
            }
        }
        let fillers = scaled(rng.gen_range(4..=14));
        for _ in 0..fillers {
            l.place_edge_trace(rng);
        }
        l.paint_holes();
        l
    }

    /// Whether `shape`, grown by the clearance, touches no copper except that of a `zones` net
    /// inside that zone.
    fn clear_of(&self, shape: &Shape, zones: &[Zone]) -> bool {
        let grown = shape.dilate(self.style.clear);
        let (w, owner, net) = (self.size, &self.owner, &self.net);
        for_each_run(&grown, w, w, |y, x0, x1| {
            owner[y * w + x0..=y * w + x1]
                .iter()
                .enumerate()
                .all(|(k, &o)| {
                    o == NO_OWNER || zones.iter().any(|z| z.admits(net[o as usize], x0 + k, y))
                })
        })
    }

    /// The zone around anchor `a` where a trace may meet other copper of the anchor's net:
    /// the anchor's own copper plus enough room for traces fanning out of it.
    fn zone(&self, a: Anchor, w: f64) -> Zone {
        let (x0, y0, x1, y1) = self.feats[a.feature as usize].bounds;
        let m = w / 2.0 + self.style.clear + 2.0;
        Zone {
            net: self.net[a.feature as usize],
            x0: x0 - m,
            y0: y0 - m,
            x1: x1 + m,
            y1: y1 + m,
        }
    }

    /// Registers a feature on `net` (a fresh net when `None`) and paints its copper.
    fn add_feature(&mut self, kind: FeatKind, shape: &Shape, net: Option<u32>) -> Option<u16> {
        if self.feats.len() >= MAX_FEATURES {
            return None;
        }
        let id = self.feats.len() as u16;
        self.feats.push(Feature {
            kind,
            bounds: shape.bounds(),
        });
        self.net.push(net.unwrap_or(u32::from(id)));
        let (w, owner) = (self.size, &mut self.owner);
        for_each_run(shape, w, w, |y, x0, x1| {
            owner[y * w + x0..=y * w + x1].fill(id);
            true
        });
        Some(id)
    }

    /// Joins two nets so later traces may touch both.
    fn merge_nets(&mut self, a: u32, b: u32) {
        if a != b {
            for n in &mut self.net {
                if *n == b {
                    *n = a;
                }
            }
        }
    }

    /// Random point that may lie a little outside the canvas, because a crop cuts through a
    /// larger board.
    fn random_point(&self, rng: &mut ChaCha8Rng, overhang: f64) -> P {
        let s = self.size as f64;
        P::new(
            rng.gen_range(-overhang..s + overhang),
            rng.gen_range(-overhang..s + overhang),
        )
    }

    /// A large chamfered copper area (ground/power pour).
    fn place_pour(&mut self, rng: &mut ChaCha8Rng, anchors: &mut Vec<Anchor>) {
        for _ in 0..12 {
            let w: f64 = rng.gen_range(90.0..320.0);
            let h = rng.gen_range(90.0..320.0);
            let c = self.random_point(rng, 60.0);
            let ch = rng.gen_range(0.0..(w.min(h) / 3.0));
            let shape = Shape::Oct {
                x0: c.x - w / 2.0,
                y0: c.y - h / 2.0,
                x1: c.x + w / 2.0,
                y1: c.y + h / 2.0,
                ch,
            };
            if self.clear_of(&shape, &[]) {
                if let Some(id) = self.add_feature(FeatKind::Solid, &shape, None) {
                    // Traces land on the pour near its centre, where the join is hidden.
                    anchors.push(Anchor { at: c, feature: id });
                }
                return;
            }
        }
    }

    /// A row of identical pads, like an IC or connector footprint.
    fn place_component(&mut self, rng: &mut ChaCha8Rng, anchors: &mut Vec<Anchor>) {
        let st = self.style;
        for _ in 0..12 {
            let kind = rng.gen_range(0..10);
            let pad: f64 = rng.gen_range(st.pad_min..st.pad_max);
            let n = rng.gen_range(1..=6);
            // Some rows leave room for a trace to pass between neighbouring pads.
            let gap = if rng.gen_bool(0.5) {
                st.clear + rng.gen_range(0.0..8.0)
            } else {
                2.0 * st.clear + st.w_thin + rng.gen_range(0.0..8.0)
            };
            let pitch = pad + gap;
            let horizontal = rng.gen_bool(0.5);
            let step = if horizontal {
                P::new(pitch, 0.0)
            } else {
                P::new(0.0, pitch)
            };
            let origin = self.random_point(rng, 30.0);
            let drilled = rng.gen_bool(0.7);
            let hole_r = rng.gen_range(4.0..8.0_f64).min(pad / 4.0);
            let mut placed = 0;
            for k in 0..n {
                let c = origin.add(step.mul(k as f64));
                let shape = match kind {
                    0..=3 => Shape::Oct {
                        x0: c.x - pad / 2.0,
                        y0: c.y - pad / 2.0,
                        x1: c.x + pad / 2.0,
                        y1: c.y + pad / 2.0,
                        ch: 0.0,
                    },
                    4..=7 => Shape::disc(c, pad / 2.0),
                    // Oblong pads, elongated across the row.
                    _ => {
                        let half = if horizontal {
                            P::new(0.0, pad * 0.3)
                        } else {
                            P::new(pad * 0.3, 0.0)
                        };
                        Shape::Capsule {
                            a: c.sub(half),
                            b: c.add(half),
                            r: pad * 0.35,
                        }
                    }
                };
                if !self.clear_of(&shape, &[]) {
                    continue;
                }
                let Some(id) = self.add_feature(FeatKind::Solid, &shape, None) else {
                    return;
                };
                anchors.push(Anchor { at: c, feature: id });
                if drilled {
                    // Ring pads get a wide hole, leaving only an annulus of copper.
                    let r = if kind == 7 { pad / 2.0 - 7.0 } else { hole_r };
                    self.holes.push((c, r.max(3.0)));
                }
                placed += 1;
            }
            if placed > 0 {
                return;
            }
        }
    }

    /// Commits a polyline trace of width `w` if it keeps clearance to all copper outside `zones`.
    fn try_trace(&mut self, pts: &[P], w: f64, zones: &[Zone], net: Option<u32>) -> bool {
        let shapes: Vec<Shape> = pts
            .windows(2)
            .map(|s| Shape::Capsule {
                a: s[0],
                b: s[1],
                r: w / 2.0,
            })
            .collect();
        if shapes.is_empty() || !shapes.iter().all(|s| self.clear_of(s, zones)) {
            return false;
        }
        let mut net = net;
        for (seg, shape) in pts.windows(2).zip(&shapes) {
            let kind = FeatKind::Seg {
                a: seg[0],
                b: seg[1],
                w,
            };
            match self.add_feature(kind, shape, net) {
                Some(id) => net = Some(self.net[id as usize]),
                None => break,
            }
        }
        true
    }

    /// Connects anchor `i` to one of its nearest anchors on another net with an octilinear path.
    fn route_between(&mut self, rng: &mut ChaCha8Rng, anchors: &[Anchor], i: usize) {
        let a = anchors[i];
        let net_a = self.net[a.feature as usize];
        // Real nets join a handful of pads; letting them grow unbounded would merge the whole
        // crop into one net and leave no gaps between different nets for shorts.
        let pads_on = |net: u32| {
            anchors
                .iter()
                .filter(|b| self.net[b.feature as usize] == net)
                .count()
        };
        let room = 3usize.saturating_sub(pads_on(net_a));
        let mut near: Vec<(f64, usize)> = anchors
            .iter()
            .enumerate()
            .filter(|(_, b)| {
                let nb = self.net[b.feature as usize];
                nb != net_a && pads_on(nb) <= room
            })
            .map(|(j, b)| (b.at.sub(a.at).len(), j))
            .filter(|(d, _)| *d < 420.0)
            .collect();
        near.sort_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
        near.truncate(4);
        near.shuffle(rng);
        let w = self.style.trace_width(rng);
        // Try a couple of neighbours: the first one is often walled in by other copper.
        for &(_, j) in near.iter().take(2) {
            let b = anchors[j];
            let net_b = self.net[b.feature as usize];
            let mut cands = octilinear_paths(a.at, b.at, rng);
            cands.shuffle(rng);
            for pts in cands {
                let zones = [self.zone(a, w), self.zone(b, w)];
                if self.try_trace(&pts, w, &zones, Some(net_a)) {
                    self.merge_nets(net_a, net_b);
                    return;
                }
            }
        }
    }

    /// Runs a trace from an anchor off the canvas, as if it continued elsewhere on the board.
    fn route_to_edge(&mut self, rng: &mut ChaCha8Rng, a: Anchor) {
        let net = self.net[a.feature as usize];
        let w = self.style.trace_width(rng);
        let far = self.size as f64 * 1.5 + 100.0;
        for _ in 0..4 {
            let d0 = if rng.gen_bool(0.75) {
                2 * rng.gen_range(0..4)
            } else {
                2 * rng.gen_range(0..4) + 1
            };
            let mut pts = vec![a.at];
            if rng.gen_bool(0.5) {
                let p1 = a.at.add(dir8(d0).mul(rng.gen_range(30.0..200.0)));
                let turn = if rng.gen_bool(0.5) { 1 } else { 7 };
                pts.push(p1);
                pts.push(p1.add(dir8(d0 + turn).mul(far)));
            } else {
                pts.push(a.at.add(dir8(d0).mul(far)));
            }
            let zones = [self.zone(a, w)];
            if self.try_trace(&pts, w, &zones, Some(net)) {
                return;
            }
        }
    }

    /// Random entry point just outside an edge, heading inwards along a cardinal direction.
    fn edge_entry(&self, rng: &mut ChaCha8Rng) -> (P, usize) {
        let s = self.size as f64;
        let t = rng.gen_range(0.0..s);
        match rng.gen_range(0..4) {
            0 => (P::new(-40.0, t), 0),
            1 => (P::new(t, -40.0), 2),
            2 => (P::new(s + 40.0, t), 4),
            _ => (P::new(t, s + 40.0), 6),
        }
    }

    /// Centre line of a trace crossing the whole canvas, with up to two 45° jogs.
    fn crossing_path(&self, rng: &mut ChaCha8Rng) -> Vec<P> {
        let (start, d0) = self.edge_entry(rng);
        let s = self.size as f64;
        let far = s * 1.5 + 100.0;
        let mut pts = vec![start];
        let mut cur = start;
        let mut d = d0;
        match rng.gen_range(0..4) {
            0 => {}
            bends @ (1 | 2) => {
                // A 45° leg between two 45° bends: a single jog back to the original heading
                // (1), or a 90° corner (2, whose leg is shorter).
                let turn = if rng.gen_bool(0.5) { 1 } else { 7 };
                cur = cur.add(dir8(d).mul(rng.gen_range(40.0..(s * 0.7).max(41.0))));
                pts.push(cur);
                let (leg, heading) = if bends == 1 {
                    (20.0..160.0, d)
                } else {
                    (15.0..80.0, (d + 2 * turn) % 8)
                };
                cur = cur.add(dir8(d + turn).mul(rng.gen_range(leg)));
                pts.push(cur);
                d = heading;
            }
            _ => {
                // Plain 90° corner.
                let turn = if rng.gen_bool(0.5) { 2 } else { 6 };
                cur = cur.add(dir8(d).mul(rng.gen_range(40.0..(s * 0.8).max(41.0))));
                pts.push(cur);
                d = (d + turn) % 8;
            }
        }
        pts.push(cur.add(dir8(d).mul(far)));
        pts
    }

    /// A trace that only passes through the crop, connecting things outside it.
    fn place_edge_trace(&mut self, rng: &mut ChaCha8Rng) {
        for _ in 0..6 {
            let pts = self.crossing_path(rng);
            let w = self.style.trace_width(rng);
            if self.try_trace(&pts, w, &[], None) {
                return;
            }
        }
    }

    /// Several parallel traces following one path, like a data bus.
    fn place_bus(&mut self, rng: &mut ChaCha8Rng) {
        let st = self.style;
        let base = self.crossing_path(rng);
        let n = rng.gen_range(2..=6);
        let w = if rng.gen_bool(0.5) {
            st.w_thin
        } else {
            st.w_norm
        };
        let pitch = w + st.clear + rng.gen_range(1.0..10.0);
        for k in 0..n {
            let pts = offset_polyline(&base, pitch * k as f64);
            self.try_trace(&pts, w, &[], None);
        }
    }

    /// Drill holes are punched last because they go through whatever copper is there.
    fn paint_holes(&mut self) {
        let (w, owner) = (self.size, &mut self.owner);
        for &(c, r) in &self.holes {
            for_each_run(&Shape::disc(c, r), w, w, |y, x0, x1| {
                owner[y * w + x0..=y * w + x1].fill(NO_OWNER);
                true
            });
        }
    }
}

/// Candidate octilinear centre lines from `a` to `b`: straight/diagonal mixes and chamfered Ls.
fn octilinear_paths(a: P, b: P, rng: &mut ChaCha8Rng) -> Vec<Vec<P>> {
    let d = b.sub(a);
    let (sx, sy) = (d.x.signum(), d.y.signum());
    let (ax, ay) = (d.x.abs(), d.y.abs());
    let mut out = Vec::new();
    if ax >= ay {
        let h = ax - ay;
        out.push(vec![a, P::new(a.x + sx * h, a.y), b]);
        out.push(vec![a, P::new(a.x + sx * ay, b.y), b]);
        let h1 = h * rng.gen_range(0.2..0.8);
        out.push(vec![
            a,
            P::new(a.x + sx * h1, a.y),
            P::new(a.x + sx * (h1 + ay), b.y),
            b,
        ]);
    } else {
        let v = ay - ax;
        out.push(vec![a, P::new(a.x, a.y + sy * v), b]);
        out.push(vec![a, P::new(b.x, a.y + sy * ax), b]);
        let v1 = v * rng.gen_range(0.2..0.8);
        out.push(vec![
            a,
            P::new(a.x, a.y + sy * v1),
            P::new(b.x, a.y + sy * (v1 + ax)),
            b,
        ]);
    }
    let c = ax.min(ay) * rng.gen_range(0.0..0.5);
    out.push(vec![
        a,
        P::new(b.x - sx * c, a.y),
        P::new(b.x, a.y + sy * c),
        b,
    ]);
    out.push(vec![
        a,
        P::new(a.x, b.y - sy * c),
        P::new(a.x + sx * c, b.y),
        b,
    ]);
    out.into_iter().map(|p| dedup_points(&p)).collect()
}

/// Drops vertices closer than half a pixel to their predecessor (zero-length segments).
fn dedup_points(pts: &[P]) -> Vec<P> {
    let mut out: Vec<P> = Vec::with_capacity(pts.len());
    for &p in pts {
        if out.last().is_none_or(|q| p.sub(*q).len() >= 0.5) {
            out.push(p);
        }
    }
    out
}

/// The polyline shifted sideways by `o` with mitred corners, so bus lines stay parallel
/// through bends.
fn offset_polyline(pts: &[P], o: f64) -> Vec<P> {
    let dirs: Vec<P> = pts
        .windows(2)
        .map(|s| {
            let d = s[1].sub(s[0]);
            d.mul(1.0 / d.len())
        })
        .collect();
    let mut out = Vec::with_capacity(pts.len());
    for (i, &p) in pts.iter().enumerate() {
        let prev = if i > 0 { Some(dirs[i - 1]) } else { None };
        let next = dirs.get(i).copied();
        let q = match (prev, next) {
            (Some(u1), Some(u2)) => {
                let denom = u1.cross(u2);
                if denom.abs() < 1e-9 {
                    p.add(u2.perp().mul(o))
                } else {
                    let dn = u2.perp().sub(u1.perp()).mul(o);
                    let t = dn.cross(u2) / denom;
                    p.add(u1.perp().mul(o)).add(u1.mul(t))
                }
            }
            (Some(u), None) | (None, Some(u)) => p.add(u.perp().mul(o)),
            (None, None) => p,
        };
        out.push(q);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn offset_polyline_keeps_distance_through_bends() {
        let d = dir8(1);
        let base = vec![
            P::new(0.0, 0.0),
            P::new(100.0, 0.0),
            P::new(100.0, 0.0).add(d.mul(50.0)),
        ];
        let off = offset_polyline(&base, 20.0);
        // First segment shifted down by 20 (perp of +x is +y), last by 20 along its own normal.
        assert!((off[0].y - 20.0).abs() < 1e-9);
        let u = d;
        let dist_last = off[2].sub(base[2]).dot(u.perp());
        assert!((dist_last - 20.0).abs() < 1e-9);
        let dist_corner_seg2 = off[1].sub(base[1]).dot(u.perp());
        assert!((dist_corner_seg2 - 20.0).abs() < 1e-9);
    }

    #[test]
    fn layouts_have_copper_and_background() {
        for s in 0..8 {
            let mut rng = ChaCha8Rng::seed_from_u64(s);
            let l = Layout::generate(640, &mut rng);
            let copper = l.owner.iter().filter(|&&o| o != NO_OWNER).count();
            let frac = copper as f64 / l.owner.len() as f64;
            assert!((0.03..0.8).contains(&frac), "copper fraction {frac}");
            assert!(l.feats.len() > 5);
        }
    }
}
