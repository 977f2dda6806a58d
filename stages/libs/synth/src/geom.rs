//! Geometry primitives and scanline rasterisation shared by the board layout and the defect painters.
//!
//! Only `+ - * /` and `sqrt` are used on floats: IEEE 754 makes those bit-exact on every
//! platform, which is what keeps a seed's pixels identical everywhere (trig functions from the
//! platform libm would not be).

/// A point (or vector) in pixel coordinates; pixel `(x, y)` is sampled at its integer coordinates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct P {
    /// Column coordinate.
    pub x: f64,
    /// Row coordinate.
    pub y: f64,
}

impl P {
    /// Builds a point.
    pub(crate) const fn new(x: f64, y: f64) -> Self {
        Self { x, y }
    }

    /// Component-wise sum.
    pub(crate) fn add(self, o: P) -> P {
        P::new(self.x + o.x, self.y + o.y)
    }

    /// Component-wise difference.
    pub(crate) fn sub(self, o: P) -> P {
        P::new(self.x - o.x, self.y - o.y)
    }

    /// Scales the vector by `k`.
    pub(crate) fn mul(self, k: f64) -> P {
        P::new(self.x * k, self.y * k)
    }

    /// Dot product.
    pub(crate) fn dot(self, o: P) -> f64 {
        self.x * o.x + self.y * o.y
    }

    /// 2-D cross product (z component of the 3-D one).
    pub(crate) fn cross(self, o: P) -> f64 {
        self.x * o.y - self.y * o.x
    }

    /// Euclidean length.
    pub(crate) fn len(self) -> f64 {
        self.dot(self).sqrt()
    }

    /// Left-hand normal of a direction (rotated by +90° in image coordinates).
    pub(crate) fn perp(self) -> P {
        P::new(-self.y, self.x)
    }
}

/// One of the eight octilinear unit directions, indexed counter-clockwise from +x in steps of 45°.
pub(crate) fn dir8(i: usize) -> P {
    const D: f64 = std::f64::consts::FRAC_1_SQRT_2;
    match i % 8 {
        0 => P::new(1.0, 0.0),
        1 => P::new(D, D),
        2 => P::new(0.0, 1.0),
        3 => P::new(-D, D),
        4 => P::new(-1.0, 0.0),
        5 => P::new(-D, -D),
        6 => P::new(0.0, -1.0),
        _ => P::new(D, -D),
    }
}

/// Convex shapes the board is drawn from; each is cheap to rasterise row by row.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Shape {
    /// All points within `r` of the segment `a`–`b` (a disc when `a == b`): traces and round pads.
    Capsule {
        /// First end of the spine.
        a: P,
        /// Second end of the spine.
        b: P,
        /// Half-width.
        r: f64,
    },
    /// Axis-aligned rectangle with 45° chamfered corners cut `ch` deep: square pads and pours.
    Oct {
        /// Left edge.
        x0: f64,
        /// Top edge.
        y0: f64,
        /// Right edge.
        x1: f64,
        /// Bottom edge.
        y1: f64,
        /// Chamfer depth along each axis.
        ch: f64,
    },
}

impl Shape {
    /// A disc of radius `r` centred on `c`.
    pub(crate) fn disc(c: P, r: f64) -> Shape {
        Shape::Capsule { a: c, b: c, r }
    }

    /// A superset of this shape grown by `d` in every direction (exact for capsules), used for
    /// clearance checks.
    pub(crate) fn dilate(&self, d: f64) -> Shape {
        match *self {
            Shape::Capsule { a, b, r } => Shape::Capsule { a, b, r: r + d },
            Shape::Oct { x0, y0, x1, y1, ch } => Shape::Oct {
                x0: x0 - d,
                y0: y0 - d,
                x1: x1 + d,
                y1: y1 + d,
                // Keeps each chamfer edge exactly `d` further out than before.
                ch: if ch > 0.0 {
                    ch + d * (2.0 - std::f64::consts::SQRT_2)
                } else {
                    0.0
                },
            },
        }
    }

    /// Bounding box `(x0, y0, x1, y1)` in continuous coordinates.
    pub(crate) fn bounds(&self) -> (f64, f64, f64, f64) {
        match *self {
            Shape::Capsule { a, b, r } => (
                a.x.min(b.x) - r,
                a.y.min(b.y) - r,
                a.x.max(b.x) + r,
                a.y.max(b.y) + r,
            ),
            Shape::Oct { x0, y0, x1, y1, .. } => (x0, y0, x1, y1),
        }
    }

    /// The closed x-interval this shape covers on row `y`, if any. Both shapes are convex, so
    /// the covered part of a row is always a single interval.
    pub(crate) fn span(&self, y: f64) -> Option<(f64, f64)> {
        match *self {
            Shape::Oct { x0, y0, x1, y1, ch } => {
                if y < y0 || y > y1 {
                    return None;
                }
                let cut = (ch - (y - y0).min(y1 - y)).max(0.0);
                let (lo, hi) = (x0 + cut, x1 - cut);
                (lo <= hi).then_some((lo, hi))
            }
            Shape::Capsule { a, b, r } => capsule_span(a, b, r, y),
        }
    }

    /// Whether the sample point `p` lies in the shape.
    pub(crate) fn contains(&self, p: P) -> bool {
        self.span(p.y)
            .is_some_and(|(lo, hi)| lo <= p.x && p.x <= hi)
    }
}

/// Row interval of a capsule: the union of its two end discs and its central band, which is a
/// single interval because the capsule is convex.
fn capsule_span(a: P, b: P, r: f64, y: f64) -> Option<(f64, f64)> {
    let mut acc: Option<(f64, f64)> = None;
    let mut merge = |lo: f64, hi: f64| {
        if lo <= hi {
            acc = Some(match acc {
                Some((l, h)) => (l.min(lo), h.max(hi)),
                None => (lo, hi),
            });
        }
    };
    for c in [a, b] {
        let dy = y - c.y;
        let q = r * r - dy * dy;
        if q >= 0.0 {
            let h = q.sqrt();
            merge(c.x - h, c.x + h);
        }
    }
    let d = b.sub(a);
    let len = d.len();
    if len > 1e-9 {
        let u = d.mul(1.0 / len);
        let yd = y - a.y;
        // Along-axis constraint 0 <= X*u.x + yd*u.y <= len, solved for X = x - a.x.
        let (mut lo, mut hi) = (f64::NEG_INFINITY, f64::INFINITY);
        let mut ok = true;
        if u.x.abs() > 1e-12 {
            let p = (0.0 - yd * u.y) / u.x;
            let q = (len - yd * u.y) / u.x;
            lo = lo.max(p.min(q));
            hi = hi.min(p.max(q));
        } else {
            let t = yd * u.y;
            ok &= (0.0..=len).contains(&t);
        }
        // Across-axis constraint |-X*u.y + yd*u.x| <= r.
        if u.y.abs() > 1e-12 {
            let p = (yd * u.x - r) / u.y;
            let q = (yd * u.x + r) / u.y;
            lo = lo.max(p.min(q));
            hi = hi.min(p.max(q));
        } else {
            ok &= (yd * u.x).abs() <= r;
        }
        if ok && lo.is_finite() && hi.is_finite() {
            merge(a.x + lo, a.x + hi);
        }
    }
    acc
}

/// Calls `f(row, x_lo, x_hi)` for every run of pixels (inclusive, clipped to `w` x `h`) that
/// `shape` covers. Stops early and returns `false` as soon as `f` does.
pub(crate) fn for_each_run(
    shape: &Shape,
    w: usize,
    h: usize,
    mut f: impl FnMut(usize, usize, usize) -> bool,
) -> bool {
    if w == 0 || h == 0 {
        return true;
    }
    let (_, by0, _, by1) = shape.bounds();
    let Some((ry0, ry1)) = clip_range(by0, by1, h) else {
        return true;
    };
    for y in ry0..=ry1 {
        if let Some((lo, hi)) = shape.span(y as f64) {
            if let Some((x0, x1)) = clip_range(lo, hi, w) {
                if !f(y, x0, x1) {
                    return false;
                }
            }
        }
    }
    true
}

/// Integer sample positions in `[lo, hi]` that fall inside `0..n`.
pub(crate) fn clip_range(lo: f64, hi: f64, n: usize) -> Option<(usize, usize)> {
    if n == 0 || lo.is_nan() || hi.is_nan() {
        return None;
    }
    let a = lo.ceil().max(0.0);
    let b = hi.floor().min((n - 1) as f64);
    (a <= b).then_some((a as usize, b as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute(shape: &Shape, w: usize, h: usize) -> Vec<bool> {
        let mut v = vec![false; w * h];
        for y in 0..h {
            for x in 0..w {
                let p = P::new(x as f64, y as f64);
                v[y * w + x] = match *shape {
                    Shape::Capsule { a, b, r } => {
                        let d = b.sub(a);
                        let l2 = d.dot(d);
                        let t = if l2 > 0.0 {
                            (p.sub(a).dot(d) / l2).clamp(0.0, 1.0)
                        } else {
                            0.0
                        };
                        p.sub(a.add(d.mul(t))).len() <= r - 1e-9
                    }
                    _ => shape.contains(p),
                };
            }
        }
        v
    }

    #[test]
    fn capsule_runs_match_point_distance() {
        let shapes = [
            Shape::Capsule {
                a: P::new(5.3, 7.1),
                b: P::new(40.2, 7.1),
                r: 4.5,
            },
            Shape::Capsule {
                a: P::new(10.0, 10.0),
                b: P::new(30.0, 30.0),
                r: 3.2,
            },
            Shape::Capsule {
                a: P::new(20.5, 3.0),
                b: P::new(20.5, 44.0),
                r: 6.0,
            },
            Shape::disc(P::new(25.0, 25.0), 9.7),
        ];
        for s in shapes {
            let exact = brute(&s, 48, 48);
            let mut got = vec![false; 48 * 48];
            for_each_run(&s, 48, 48, |y, x0, x1| {
                for x in x0..=x1 {
                    got[y * 48 + x] = true;
                }
                true
            });
            // Rows may disagree only on pixels sitting exactly on the boundary.
            let diff = exact.iter().zip(&got).filter(|(a, b)| a != b).count();
            assert!(diff <= 2, "{s:?}: {diff} pixels differ");
            assert!(got.iter().filter(|&&b| b).count() > 20);
        }
    }

    #[test]
    fn dilated_octagon_contains_original() {
        let s = Shape::Oct {
            x0: 10.0,
            y0: 12.0,
            x1: 50.0,
            y1: 40.0,
            ch: 8.0,
        };
        let d = s.dilate(5.0);
        for y in 0..64 {
            for x in 0..64 {
                let p = P::new(x as f64, y as f64);
                if s.contains(p) {
                    assert!(d.contains(p));
                }
            }
        }
        assert!(!s.contains(P::new(10.0, 12.0)), "corner is chamfered");
        assert!(s.contains(P::new(30.0, 12.0)));
    }
}
