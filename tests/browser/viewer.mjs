// Drives the viewer in headless Chromium (Debian's /usr/bin/chromium) for the Rust tests and
// `pcb bench viewer`, and prints what it saw as one JSON object; the caller compares that
// with the truth from the streams, so this script asserts nothing itself beyond page loads.
//
// Usage: node viewer.mjs <mode> <viewer-url> [options as JSON]
//   check   {board, slider, cross_site: {name, version}, promote: {name, version}, shots}:
//           overview yield, a board's boxes and slider, the boards list, form posts to
//           promote and upload from a page of another origin (their answers' statuses), a
//           promotion from the Models page; screenshots
//   timing  {boards: [image ids], repeat}: time from navigation to data-ready per page
//   review  {board, delete, draw: {x1, y1, x2, y2, class}, by, note}: on a board page, deletes
//           the review's box number `delete` (0-based), draws a box by dragging over the
//           image (image pixels), saves, and waits until the history shows the revision
//   models  {}: the Models page's canary: its heading, each row of its figures (version,
//           boards answered, fail rate, right on corrected boards) and the canary badges
import { chromium } from "playwright-core";
import fs from "node:fs";
import http from "node:http";
import path from "node:path";

const [mode, base, optsText] = process.argv.slice(2);
const opts = optsText ? JSON.parse(optsText) : {};
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";

function url(p) {
  return new URL(p, base).toString();
}

// Navigates and waits for the page's first complete render; returns milliseconds.
async function open(page, p) {
  const t0 = Date.now();
  await page.goto(url(p), { waitUntil: "domcontentloaded" });
  await page.waitForSelector('body[data-ready="1"]', { timeout: 30000 });
  const ms = Date.now() - t0;
  const error = await page.locator("#error").textContent().catch(() => "");
  return { ms, error: (error || "").trim() };
}

async function shot(page, name) {
  if (!opts.shots) return null;
  fs.mkdirSync(opts.shots, { recursive: true });
  const file = path.join(opts.shots, name);
  await page.screenshot({ path: file, fullPage: true });
  return file;
}

async function visibleBoxes(page) {
  return page.$$eval("rect.det", (rs) =>
    rs.filter((r) => getComputedStyle(r).display !== "none").length,
  );
}

async function check(page) {
  const out = { shots: [] };
  const overview = await open(page, "/?window=0");
  // The window selector defaults to a day: all time, to count every board of the test.
  await page.selectOption("#window", "0");
  await page.waitForFunction(() => {
    const y = document.querySelector("#yield");
    return y && y.dataset.value !== undefined && y.dataset.value !== "";
  }, null, { timeout: 30000 });
  await page.waitForTimeout(500);
  out.overview = {
    load_ms: overview.ms,
    error: overview.error,
    yield: Number(await page.getAttribute("#yield", "data-value")),
    yield_text: (await page.textContent("#yield")).trim(),
    inspected: Number((await page.textContent("#inspected")).replace(/[^0-9]/g, "")),
  };
  out.shots.push(await shot(page, "overview.png"));

  const board = await open(page, `/boards/${opts.board}`);
  const scores = await page.$$eval("rect.det", (rs) => rs.map((r) => Number(r.dataset.score)));
  out.board = { load_ms: board.ms, error: board.error, boxes: scores.length, scores };
  out.board.gt_boxes = await page.locator("rect.gt").count();
  out.board.visible_before = await visibleBoxes(page);
  out.shots.push(await shot(page, "board.png"));
  // As a user's drag ends: the value set, then the input event the page listens to.
  await page.$eval("#min-score", (el, v) => {
    el.value = v;
    el.dispatchEvent(new Event("input", { bubbles: true }));
    el.dispatchEvent(new Event("change", { bubbles: true }));
  }, Number(opts.slider).toFixed(2));
  await page.waitForTimeout(200);
  out.board.slider = Number(await page.inputValue("#min-score"));
  out.board.visible_after = await visibleBoxes(page);
  out.board.visible_count_text = (await page.textContent("#visible-count")).trim();
  out.shots.push(await shot(page, "board-slider.png"));

  const list = await open(page, "/boards");
  out.boards = { load_ms: list.ms, error: list.error, rows: await page.locator("tr.board-row").count() };
  out.shots.push(await shot(page, "boards.png"));

  if (opts.cross_site) out.cross_site = await crossSite(page, opts.cross_site);

  if (opts.promote) {
    const models = await open(page, "/models");
    out.models = { load_ms: models.ms, error: models.error };
    out.models.live_before = (await page.textContent("#live-version")).trim();
    page.once("dialog", (d) => {
      out.models.confirm = d.message();
      d.accept();
    });
    await page.click(`tr[data-version="${opts.promote.version}"] button.promote`);
    await page.waitForFunction(
      (v) => (document.querySelector("#live-version")?.textContent || "").trim() === String(v),
      opts.promote.version,
      { timeout: 30000 },
    );
    out.models.live_after = (await page.textContent("#live-version")).trim();
    out.shots.push(await shot(page, "models.png"));
  }
  return out;
}

// A page served from another origin (another port) whose forms post to the viewer, as a
// malicious site open in the operator's browser could: a text/plain form shaped as JSON to
// promote, and a multipart form to upload. Returns the status of each answer.
async function crossSite(page, { name, version }) {
  const promote = url(`/api/models/${encodeURIComponent(name)}/promote`);
  const upload = url("/api/upload?name=evil.png&line=evil");
  const html = `<!doctype html><html><body>
    <form id="promote" method="post" enctype="text/plain" action="${promote}">
      <input name='{"version": ${version}, "x": "' value='"}'></form>
    <form id="upload" method="post" enctype="multipart/form-data" action="${upload}">
      <input name="file" value="not an image"></form></body></html>`;
  const server = http.createServer((_, res) => {
    res.setHeader("content-type", "text/html");
    res.end(html);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const other = `http://127.0.0.1:${server.address().port}/`;
  const statuses = {};
  try {
    for (const form of ["promote", "upload"]) {
      await page.goto(other, { waitUntil: "domcontentloaded" });
      const [answer] = await Promise.all([
        page.waitForNavigation({ timeout: 30000 }),
        page.evaluate((id) => document.getElementById(id).submit(), form),
      ]);
      statuses[form] = answer ? answer.status() : null;
    }
  } finally {
    server.close();
  }
  return { from: other, statuses };
}

async function editBoxes(page) {
  return page.$$eval("#edit-boxes tr.edit-row", (rows) =>
    rows.map((r) => ({
      class: r.querySelector("select.edit-class").value,
      box: r.children[2].textContent.split(",").map((v) => Number(v.trim())),
    })),
  );
}

// The review queue as the Review page shows it: its counts and the boards listed.
async function queueOf(page) {
  await open(page, "/review");
  return {
    waiting: Number(await page.getAttribute("#queue-counts", "data-waiting")),
    corrected: Number(await page.getAttribute("#queue-counts", "data-corrected")),
    ids: await page.$$eval("#queue tr.queue-row", (rows) => rows.map((r) => r.dataset.id)),
  };
}

async function review(page) {
  const out = { shots: [] };
  out.queue_before = await queueOf(page);
  const board = await open(page, `/boards/${opts.board}`);
  out.load_ms = board.ms;
  out.error = board.error;
  out.model_boxes = await page.locator("rect.det").count();
  out.before = await editBoxes(page);
  out.versus = (await page.textContent("#versus")).trim();
  out.shots.push(await shot(page, "review-before.png"));
  await page.click(`#edit-boxes button.edit-delete[data-i="${opts.delete}"]`);
  out.after_delete = await editBoxes(page);
  // Drag over the image as an operator would: image pixels to screen points via the SVG.
  const d = opts.draw;
  await page.selectOption("#new-class", d.class);
  await page.click("#draw-box");
  // The whole picture in the viewport, so every point of the drag is on screen.
  await page.$eval("#board", (el) => el.scrollIntoView({ block: "center" }));
  const pts = await page.$eval(
    "#board",
    (svg, d) => {
      const m = svg.getScreenCTM();
      const at = (x, y) => {
        const p = svg.createSVGPoint();
        p.x = x;
        p.y = y;
        const q = p.matrixTransform(m);
        return [q.x, q.y];
      };
      return [at(d.x1, d.y1), at(d.x2, d.y2)];
    },
    d,
  );
  await page.mouse.move(pts[0][0], pts[0][1]);
  await page.mouse.down();
  await page.mouse.move(pts[1][0], pts[1][1], { steps: 8 });
  await page.mouse.up();
  out.after_draw = await editBoxes(page);
  out.drawn_rects = await page.locator("#board rect.edit[data-i]").count();
  await page.fill("#review-by", opts.by);
  await page.fill("#review-note", opts.note || "");
  out.shots.push(await shot(page, "review-edited.png"));
  await page.click("#save-labels");
  await page.waitForSelector('#review-status[data-state="stored"]', { timeout: 60000 });
  out.status = (await page.textContent("#review-status")).trim();
  out.revision = await page.getAttribute("#review-status", "data-revision");
  out.history = await page.$$eval("#history tr.history-row", (rows) =>
    rows.map((r) => ({
      digest: r.dataset.digest,
      cells: [...r.children].map((c) => c.textContent.trim()),
    })),
  );
  out.labels_now = await page.locator("rect.gt").count();
  out.shots.push(await shot(page, "review-saved.png"));
  // A reload shows the same history: it is the pipeline's, not the page's.
  await open(page, `/boards/${opts.board}`);
  out.history_after_reload = await page.locator("#history tr.history-row").count();
  out.queue_after = await queueOf(page);
  return out;
}

async function models(page) {
  const r = await open(page, "/models");
  await page.waitForSelector("table.canary-figures", { timeout: 30000 });
  const rows = await page.$$eval("table.canary-figures tbody tr", (trs) =>
    trs.map((tr) => ({
      who: tr.className.replace(/^canary-/, ""),
      version: tr.querySelector("td b").textContent.trim(),
      boards: tr.querySelector(".canary-boards").textContent.trim(),
      fail_rate: tr.querySelector(".canary-fail-rate").textContent.trim(),
      accuracy: tr.querySelector(".canary-accuracy").textContent.trim(),
    })),
  );
  const heading = (await page.textContent("div.canary h3")).replace(/\s+/g, " ").trim();
  const badges = await page.$$eval(".canary-badge", (bs) => bs.length);
  return { load_ms: r.ms, error: r.error, heading, rows, badges };
}

async function timing(page) {
  const repeat = opts.repeat || 3;
  const pages = [
    ["overview (all time)", "/?window=0"],
    ["boards, page 1", "/boards"],
    ["boards, page 1000", "/boards?page=1000"],
    ["boards, line + fail", "/boards?line=line-1&verdict=fail"],
    ["models", "/models"],
  ];
  for (const id of opts.boards || []) pages.push([`board ${id.slice(0, 8)}`, `/boards/${id}`]);
  const rows = [];
  for (const [name, p] of pages) {
    const times = [];
    let error = "";
    for (let i = 0; i < repeat; i++) {
      const r = await open(page, p);
      times.push(r.ms);
      error = error || r.error;
    }
    times.sort((a, b) => a - b);
    rows.push({ page: name, path: p, median_ms: times[Math.floor(times.length / 2)], max_ms: times[times.length - 1], error });
  }
  return { rows };
}

const browser = await chromium.launch({ executablePath, args: ["--no-sandbox"] });
let code = 0;
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  const out =
    mode === "timing"
      ? await timing(page)
      : mode === "review"
        ? await review(page)
        : mode === "models"
          ? await models(page)
          : await check(page);
  out.page_errors = errors;
  console.log(JSON.stringify(out));
} catch (e) {
  console.error(`viewer.mjs: ${e.stack || e}`);
  code = 1;
} finally {
  await browser.close();
}
process.exit(code);
