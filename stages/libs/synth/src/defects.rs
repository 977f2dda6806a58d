//! Paints the six DeepPCB defect kinds into a copy of the template and measures their boxes.
//!
//! Each candidate defect is first computed as a list of pixels to flip, then accepted only if the
//! area it inspected and its box stay clear of every earlier box. That ordering is what makes
//! the boxes exact: pixels outside all boxes are never touched, and every box holds changes.

use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::geom::{clip_range, Shape, P};
use crate::layout::{FeatKind, Layout, NO_OWNER};
use crate::SynthDefect;

/// Slack added around the changed pixels, like the loose boxes of DeepPCB annotators.
const BOX_MARGIN: usize = 2;
/// Minimum free pixels between two boxes, so neighbouring annotations never touch.
const BOX_GAP: usize = 2;
/// Smallest side of the changed area, so boxes (with margin) are at least ~9 px like DeepPCB's.
const MIN_EXTENT: usize = 5;
/// Largest side of the changed area, so boxes (with margin) stay within DeepPCB's ~60 px.
const MAX_EXTENT: usize = 56;

/// Inclusive pixel rectangle `(x0, y0, x1, y1)`.
type Rect = (usize, usize, usize, usize);

/// A candidate defect: pixels to flip and the area whose content justified it.
struct Candidate {
    /// Row-major indices of pixels that toggle between copper and background.
    flips: Vec<usize>,
    /// Pixels the candidate's checks read; they must not overlap earlier defects either, or
    /// those checks would have looked at already-altered copper.
    inspected: Rect,
}

/// Copper and background pixel values; DeepPCB shows dark copper on a light substrate.
pub(crate) const COPPER: u8 = 0;
/// Background (bare substrate) pixel value.
pub(crate) const BACKGROUND: u8 = 255;

/// Adds 3–12 random defects to `test` (a copy of the template) and returns their boxes.
pub(crate) fn add_defects(
    layout: &Layout,
    test: &mut [u8],
    rng: &mut ChaCha8Rng,
) -> Vec<SynthDefect> {
    let target = rng.gen_range(3..=12);
    let mut boxes: Vec<(Rect, u8)> = Vec::new();
    let mut painter = Painter {
        layout,
        boxes: &mut boxes,
    };
    for _ in 0..target {
        // A board may lack room for some kinds (no wide copper, no free gaps), so fall back to
        // the other kinds, in random order so no kind profits from another's failures.
        let mut classes: [u8; 6] = [1, 2, 3, 4, 5, 6];
        classes.shuffle(rng);
        for (k, &class) in classes.iter().enumerate() {
            let tries = if k == 0 { 150 } else { 40 };
            if let Some(c) = (0..tries).find_map(|_| painter.attempt(class, rng)) {
                painter.accept(&c, class);
                for &i in &c.flips {
                    test[i] = if test[i] == COPPER {
                        BACKGROUND
                    } else {
                        COPPER
                    };
                }
                break;
            }
        }
    }
    boxes
        .into_iter()
        .map(|((x1, y1, x2, y2), class_id)| SynthDefect {
            x1: x1 as u32,
            y1: y1 as u32,
            x2: x2 as u32,
            y2: y2 as u32,
            class_id,
        })
        .collect()
}

/// Proposes defects on one layout and keeps the boxes accepted so far.
struct Painter<'a> {
    /// The template the defects are judged against.
    layout: &'a Layout,
    /// Accepted boxes with their class ids.
    boxes: &'a mut Vec<(Rect, u8)>,
}

impl Painter<'_> {
    /// Canvas side in pixels.
    fn size(&self) -> usize {
        self.layout.size
    }

    /// Template feature at a pixel.
    fn owner(&self, x: usize, y: usize) -> u16 {
        self.layout.owner[y * self.size() + x]
    }

    /// Template net at a pixel (0 for background).
    fn net_at(&self, x: usize, y: usize) -> u32 {
        self.layout.net[self.owner(x, y) as usize]
    }

    /// One random try at a defect of `class`; `None` when the spot drawn does not suit it.
    fn attempt(&mut self, class: u8, rng: &mut ChaCha8Rng) -> Option<Candidate> {
        let c = match class {
            1 => self.open(rng),
            2 => self.short(rng),
            3 => self.mousebite(rng),
            4 => self.spur(rng),
            5 => self.copper(rng),
            _ => self.pin_hole(rng),
        }?;
        self.validate(&c).then_some(c)
    }

    /// The box (with margin) a candidate would get, if its size is acceptable.
    fn box_of(&self, c: &Candidate) -> Option<Rect> {
        let n = self.size();
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
        for &i in &c.flips {
            let (x, y) = (i % n, i / n);
            x0 = x0.min(x);
            y0 = y0.min(y);
            x1 = x1.max(x);
            y1 = y1.max(y);
        }
        if c.flips.is_empty() {
            return None;
        }
        let (w, h) = (x1 - x0 + 1, y1 - y0 + 1);
        if w.min(h) < MIN_EXTENT || w.max(h) > MAX_EXTENT {
            return None;
        }
        Some((
            x0.saturating_sub(BOX_MARGIN),
            y0.saturating_sub(BOX_MARGIN),
            (x1 + BOX_MARGIN).min(n - 1),
            (y1 + BOX_MARGIN).min(n - 1),
        ))
    }

    /// Whether the candidate has a well-sized box and keeps clear of every accepted box.
    fn validate(&self, c: &Candidate) -> bool {
        let Some(bx) = self.box_of(c) else {
            return false;
        };
        let hits = |r: &Rect| {
            self.boxes.iter().any(|(b, _)| {
                r.0 <= b.2 + BOX_GAP
                    && b.0 <= r.2 + BOX_GAP
                    && r.1 <= b.3 + BOX_GAP
                    && b.1 <= r.3 + BOX_GAP
            })
        };
        !hits(&bx) && !hits(&c.inspected)
    }

    /// Records the candidate's box; the caller flips its pixels.
    fn accept(&mut self, c: &Candidate, class: u8) {
        if let Some(bx) = self.box_of(c) {
            self.boxes.push((bx, class));
        }
    }

    /// Pixel rectangle covering continuous bounds, clipped to the canvas.
    fn rect(&self, b: (f64, f64, f64, f64)) -> Option<Rect> {
        let n = self.size();
        let (x0, x1) = clip_range(b.0, b.2, n)?;
        let (y0, y1) = clip_range(b.1, b.3, n)?;
        Some((x0, y0, x1, y1))
    }

    /// A random trace segment at least `min_w` wide, with its frame (origin, direction,
    /// normal, length, width, id).
    fn pick_seg(&self, rng: &mut ChaCha8Rng, min_w: f64) -> Option<SegFrame> {
        let feats = &self.layout.feats;
        if feats.len() < 2 {
            return None;
        }
        for _ in 0..8 {
            let id = rng.gen_range(1..feats.len());
            if let FeatKind::Seg { a, b, w } = feats[id].kind {
                let d = b.sub(a);
                let len = d.len();
                if w >= min_w && len > 2.0 * w + 30.0 {
                    let u = d.mul(1.0 / len);
                    return Some(SegFrame {
                        a,
                        u,
                        n: u.perp(),
                        len,
                        w,
                        id: id as u16,
                    });
                }
            }
        }
        None
    }

    /// Collects pixels in `area` (continuous bounds) accepted by `pick`, after checking that
    /// every pixel of the same area passes `ok`.
    fn scan(
        &self,
        area: (f64, f64, f64, f64),
        mut ok: impl FnMut(usize, usize) -> bool,
        mut pick: impl FnMut(usize, usize) -> bool,
    ) -> Option<Candidate> {
        let r = self.rect(area)?;
        let n = self.size();
        let mut flips = Vec::new();
        for y in r.1..=r.3 {
            for x in r.0..=r.2 {
                if !ok(x, y) {
                    return None;
                }
                if pick(x, y) {
                    flips.push(y * n + x);
                }
            }
        }
        Some(Candidate {
            flips,
            inspected: r,
        })
    }

    /// The copper of trace `f` to remove where `cut(t, s)` holds, for a defect that takes
    /// copper away between `t = lo` and `t = hi`: refused unless the trace is the only copper
    /// up to 4 px beyond its edges there ([`SegFrame::exclusive`]).
    fn cut_trace(
        &self,
        f: &SegFrame,
        lo: f64,
        hi: f64,
        cut: impl Fn(f64, f64) -> bool,
    ) -> Option<Candidate> {
        let half = f.w / 2.0 + 4.0;
        self.scan(
            f.area(lo, hi, half),
            |x, y| f.exclusive(self, x, y, lo, hi, half),
            |x, y| {
                let (t, s) = f.local(x, y);
                self.owner(x, y) == f.id && cut(t, s)
            },
        )
    }

    /// A gap cut straight (or slightly slanted) across a trace.
    fn open(&self, rng: &mut ChaCha8Rng) -> Option<Candidate> {
        let f = self.pick_seg(rng, 6.0)?;
        let gap = rng.gen_range(5.0..16.0);
        let slant: f64 = rng.gen_range(-0.4..0.4);
        let hw = f.w / 2.0;
        let pad = 4.0 + slant.abs() * (hw + 4.0);
        let t0 = uniform(rng, pad + hw, f.len - gap - pad - hw)?;
        let (lo, hi) = (t0 - pad, t0 + gap + pad);
        self.cut_trace(&f, lo, hi, |t, s| {
            let shift = slant * s;
            s.abs() <= hw + 1.5 && t >= t0 + shift && t <= t0 + gap + shift
        })
    }

    /// One to three small bites taken out of one edge of a trace.
    fn mousebite(&self, rng: &mut ChaCha8Rng) -> Option<Candidate> {
        let f = self.pick_seg(rng, 10.0)?;
        let hw = f.w / 2.0;
        let side = if rng.gen_bool(0.5) { 1.0 } else { -1.0 };
        let rmax = (f.w * 0.4).min(6.5);
        // Bites under 3 px radius vanish into JPEG noise.
        let n = rng.gen_range(1..=3);
        let mut bites = Vec::with_capacity(n);
        let mut t = 0.0;
        for k in 0..n {
            let r = uniform(rng, 3.0, rmax)?;
            if k > 0 {
                t += r * rng.gen_range(1.2..2.4);
            }
            bites.push((t, side * (hw + rng.gen_range(-1.0..1.0)), r));
        }
        let span = t + 2.0 * rmax + 8.0;
        let start = uniform(rng, hw + rmax + 4.0, f.len - hw - span)?;
        let (lo, hi) = (start - rmax - 4.0, start + t + rmax + 4.0);
        if hi > f.len - hw {
            return None;
        }
        self.cut_trace(&f, lo, hi, |tt, s| {
            bites.iter().any(|&(bt, bs, r)| {
                let (dt, ds) = (tt - start - bt, s - bs);
                dt * dt + ds * ds <= r * r
            })
        })
    }

    /// A tapered sliver of copper sticking out of a trace edge.
    fn spur(&self, rng: &mut ChaCha8Rng) -> Option<Candidate> {
        let f = self.pick_seg(rng, 6.0)?;
        let hw = f.w / 2.0;
        let side = if rng.gen_bool(0.5) { 1.0 } else { -1.0 };
        let length = rng.gen_range(6.0..18.0);
        let r0 = rng.gen_range(2.5..4.5);
        let r1 = rng.gen_range(0.8..2.0);
        let tilt = rng.gen_range(-0.8..0.8) * length;
        let t0 = uniform(rng, hw + 12.0, f.len - hw - 12.0)?;
        // Spur spine in the trace's (t, s) frame, from inside the copper out to the tip.
        let (bt, bs) = (t0, side * (hw - 1.0));
        let (tt, ts) = (t0 + tilt, side * (hw + length));
        let (lo, hi) = (t0.min(t0 + tilt) - r0 - 5.0, t0.max(t0 + tilt) + r0 + 5.0);
        if lo < hw || hi > f.len - hw {
            return None;
        }
        let reach = hw + length + r1 + 5.0;
        let area = f.area(lo, hi, reach);
        let (dt, ds) = (tt - bt, ts - bs);
        let l2 = dt * dt + ds * ds;
        self.scan(
            area,
            // Anything but the trace itself nearby would turn the spur into a short.
            |x, y| {
                let o = self.owner(x, y);
                o == NO_OWNER || o == f.id
            },
            |x, y| {
                if self.owner(x, y) != NO_OWNER {
                    return false;
                }
                let (t, s) = f.local(x, y);
                let v = (((t - bt) * dt + (s - bs) * ds) / l2).clamp(0.0, 1.0);
                let (et, es) = (t - (bt + v * dt), s - (bs + v * ds));
                let r = r0 + (r1 - r0) * v;
                et * et + es * es <= r * r
            },
        )
    }

    /// A thin, slightly kinked bridge across the gap between two different nets.
    fn short(&self, rng: &mut ChaCha8Rng) -> Option<Candidate> {
        let n = self.size();
        // Most starts sit just beside a trace and march along its normal, because random
        // pixels mostly land in open areas with nothing within reach.
        let (qx, qy, sx, sy) = if rng.gen_bool(0.7) {
            let f = self.pick_seg(rng, 0.0)?;
            let t = rng.gen_range(0.0..f.len);
            let side = if rng.gen_bool(0.5) { 1.0 } else { -1.0 };
            let off = f.w / 2.0 + rng.gen_range(1.5..12.0);
            let q = f.a.add(f.u.mul(t)).add(f.n.mul(side * off));
            let (x, y) = (q.x.round(), q.y.round());
            if x < 0.0 || y < 0.0 || x >= n as f64 || y >= n as f64 {
                return None;
            }
            let step = |v: f64| -> isize {
                if v > 0.3 {
                    1
                } else if v < -0.3 {
                    -1
                } else {
                    0
                }
            };
            (x as usize, y as usize, step(f.n.x), step(f.n.y))
        } else {
            let (sx, sy) = [(1, 0), (0, 1), (1, 1), (1, -1)][rng.gen_range(0..4)];
            (rng.gen_range(0..n), rng.gen_range(0..n), sx, sy)
        };
        if self.owner(qx, qy) != NO_OWNER {
            return None;
        }
        let march = |dir: isize| -> Option<(usize, usize, usize)> {
            for k in 1..=40isize {
                let x = qx as isize + dir * sx * k;
                let y = qy as isize + dir * sy * k;
                if x < 0 || y < 0 || x >= n as isize || y >= n as isize {
                    return None;
                }
                let (x, y) = (x as usize, y as usize);
                if self.owner(x, y) != NO_OWNER {
                    return Some((x, y, k as usize));
                }
            }
            None
        };
        let (ax, ay, ka) = march(-1)?;
        let (bx, by, kb) = march(1)?;
        let (net_a, net_b) = (self.net_at(ax, ay), self.net_at(bx, by));
        // Diagonal steps are 1.4 px long; cap both kinds near 40 px so a short stays a short
        // bridge rather than something that reads as a trace.
        let steps = ka + kb;
        let max_steps = if sx != 0 && sy != 0 { 28 } else { 40 };
        if net_a == net_b || steps < 5 || steps > max_steps {
            return None;
        }
        let (a, b) = (P::new(ax as f64, ay as f64), P::new(bx as f64, by as f64));
        let d = b.sub(a);
        let mid = a
            .add(d.mul(0.5))
            .add(d.perp().mul(rng.gen_range(-0.12..0.12)));
        let r = rng.gen_range(1.6..3.6);
        let bridge = [
            Shape::Capsule { a, b: mid, r },
            Shape::Capsule { a: mid, b, r },
        ];
        let guard = [bridge[0].dilate(3.0), bridge[1].dilate(3.0)];
        let bounds = guard[0].bounds();
        let g1 = guard[1].bounds();
        let area = (
            bounds.0.min(g1.0),
            bounds.1.min(g1.1),
            bounds.2.max(g1.2),
            bounds.3.max(g1.3),
        );
        self.scan(
            area,
            // A third net brushing the bridge would make the defect ambiguous.
            |x, y| {
                let p = P::new(x as f64, y as f64);
                self.owner(x, y) == NO_OWNER
                    || !guard.iter().any(|g| g.contains(p))
                    || [net_a, net_b].contains(&self.net_at(x, y))
            },
            |x, y| {
                let p = P::new(x as f64, y as f64);
                self.owner(x, y) == NO_OWNER && bridge.iter().any(|s| s.contains(p))
            },
        )
    }

    /// An isolated irregular blob of copper on bare substrate.
    fn copper(&self, rng: &mut ChaCha8Rng) -> Option<Candidate> {
        let n = self.size() as f64;
        let c = P::new(rng.gen_range(0.0..n), rng.gen_range(0.0..n));
        let r = rng.gen_range(3.0..9.0);
        let mut discs = vec![Shape::disc(c, r)];
        for _ in 0..rng.gen_range(1..=3) {
            let off = P::new(rng.gen_range(-r..r), rng.gen_range(-r..r));
            discs.push(Shape::disc(c.add(off), r * rng.gen_range(0.4..0.8)));
        }
        let reach = 2.0 * r + 6.0;
        let area = (c.x - reach, c.y - reach, c.x + reach, c.y + reach);
        self.scan(
            area,
            |x, y| self.owner(x, y) == NO_OWNER,
            |x, y| {
                let p = P::new(x as f64, y as f64);
                discs.iter().any(|s| s.contains(p))
            },
        )
    }

    /// A small round void well inside a pad, pour or wide trace.
    fn pin_hole(&self, rng: &mut ChaCha8Rng) -> Option<Candidate> {
        let feats = &self.layout.feats;
        if feats.len() < 2 {
            return None;
        }
        let id = rng.gen_range(1..feats.len());
        let wide = match feats[id].kind {
            FeatKind::Solid => true,
            FeatKind::Seg { w, .. } => w >= 18.0,
        };
        if !wide {
            return None;
        }
        let b = feats[id].bounds;
        let (bx0, by0, bx1, by1) = self.rect(b)?;
        let c = P::new(
            rng.gen_range(bx0..=bx1) as f64,
            rng.gen_range(by0..=by1) as f64,
        );
        let r = rng.gen_range(3.0..6.0);
        let hole = Shape::disc(c, r);
        let guard = Shape::disc(c, r + 3.0);
        let area = guard.bounds();
        // The guard must be fully on the canvas, or the hole could sit on an unseen edge.
        let n = self.size() as f64;
        if area.0 < 0.0 || area.1 < 0.0 || area.2 > n - 1.0 || area.3 > n - 1.0 {
            return None;
        }
        self.scan(
            area,
            |x, y| self.owner(x, y) != NO_OWNER || !guard.contains(P::new(x as f64, y as f64)),
            |x, y| hole.contains(P::new(x as f64, y as f64)),
        )
    }
}

/// Uniform sample from `[lo, hi)`, or `None` when the range is empty (a segment too short for
/// the defect), since `gen_range` would panic there.
fn uniform(rng: &mut ChaCha8Rng, lo: f64, hi: f64) -> Option<f64> {
    (lo < hi).then(|| rng.gen_range(lo..hi))
}

/// A trace segment's local frame: `t` runs along the centre line from `a`, `s` across it.
struct SegFrame {
    /// Start of the centre line.
    a: P,
    /// Unit direction along the trace.
    u: P,
    /// Unit normal.
    n: P,
    /// Length of the centre line.
    len: f64,
    /// Copper width.
    w: f64,
    /// Feature id of the segment.
    id: u16,
}

impl SegFrame {
    /// `(t, s)` coordinates of pixel `(x, y)`.
    fn local(&self, x: usize, y: usize) -> (f64, f64) {
        let d = P::new(x as f64, y as f64).sub(self.a);
        (d.dot(self.u), d.dot(self.n))
    }

    /// Canvas bounds of the frame rectangle `t in [lo, hi]`, `|s| <= half`.
    fn area(&self, lo: f64, hi: f64, half: f64) -> (f64, f64, f64, f64) {
        let corners = [(lo, -half), (lo, half), (hi, -half), (hi, half)]
            .map(|(t, s)| self.a.add(self.u.mul(t)).add(self.n.mul(s)));
        corners.iter().fold(
            (
                f64::INFINITY,
                f64::INFINITY,
                f64::NEG_INFINITY,
                f64::NEG_INFINITY,
            ),
            |b, p| (b.0.min(p.x), b.1.min(p.y), b.2.max(p.x), b.3.max(p.y)),
        )
    }

    /// Within the frame rectangle, the trace must be the only copper and must be solid, so a
    /// cut or bite there affects this trace alone (not a junction, pad or neighbour).
    fn exclusive(&self, p: &Painter<'_>, x: usize, y: usize, lo: f64, hi: f64, half: f64) -> bool {
        let (t, s) = self.local(x, y);
        if t < lo || t > hi || s.abs() > half {
            return true;
        }
        let o = p.owner(x, y);
        if s.abs() <= self.w / 2.0 - 1.0 {
            o == self.id
        } else {
            o == NO_OWNER || o == self.id
        }
    }
}
