//! Box operations torchvision implements as its own C++ ops (libtorch has none of them):
//! IoU, NMS, batched NMS and RoI align, with the same semantics as `torchvision.ops`.

use tch::{Kind, Tensor};

/// Area of `[N, 4]` boxes in `(x1, y1, x2, y2)`.
pub fn box_area(boxes: &Tensor) -> Tensor {
    (boxes.select(1, 2) - boxes.select(1, 0)) * (boxes.select(1, 3) - boxes.select(1, 1))
}

/// Pairwise IoU of `[N, 4]` and `[M, 4]` boxes: `[N, M]`, as `torchvision.ops.box_iou`.
pub fn box_iou(a: &Tensor, b: &Tensor) -> Tensor {
    let area_a = box_area(a);
    let area_b = box_area(b);
    let lt = a
        .slice(1, 0, 2, 1)
        .unsqueeze(1)
        .maximum(&b.slice(1, 0, 2, 1).unsqueeze(0));
    let rb = a
        .slice(1, 2, 4, 1)
        .unsqueeze(1)
        .minimum(&b.slice(1, 2, 4, 1).unsqueeze(0));
    let wh = (rb - lt).clamp_min(0.0);
    let inter = wh.select(2, 0) * wh.select(2, 1);
    let union = area_a.unsqueeze(1) + area_b.unsqueeze(0) - &inter;
    inter / union
}

/// Clamps boxes into an image of `(height, width)`.
pub fn clip_boxes_to_image(boxes: &Tensor, height: i64, width: i64) -> Tensor {
    let x = boxes.slice(-1, 0, 4, 2).clamp(0.0, width as f64);
    let y = boxes.slice(-1, 1, 4, 2).clamp(0.0, height as f64);
    Tensor::stack(&[x, y], -1).reshape(boxes.size())
}

/// Indices of boxes whose sides are both at least `min_size`.
pub fn remove_small_boxes(boxes: &Tensor, min_size: f64) -> Tensor {
    let ws = boxes.select(1, 2) - boxes.select(1, 0);
    let hs = boxes.select(1, 3) - boxes.select(1, 1);
    let keep = ws.ge(min_size).logical_and(&hs.ge(min_size));
    keep.nonzero().squeeze_dim(1)
}

/// Greedy NMS on the CPU: indices of the kept boxes by decreasing score, as
/// `torchvision.ops.nms` (a box is dropped when its IoU with a kept one is above
/// `iou_threshold`; ties in score keep their input order).
pub fn nms(boxes: &Tensor, scores: &Tensor, iou_threshold: f64) -> Tensor {
    let n = boxes.size()[0];
    if n == 0 {
        return Tensor::zeros([0], (Kind::Int64, tch::Device::Cpu));
    }
    let device = boxes.device();
    let (_, order) = scores
        .to_kind(Kind::Float)
        .to_device(tch::Device::Cpu)
        .sort_stable(true, 0, true);
    let order: Vec<i64> = Vec::<i64>::try_from(&order).unwrap_or_default();
    let flat: Vec<f32> = Vec::<f32>::try_from(
        &boxes
            .to_kind(Kind::Float)
            .to_device(tch::Device::Cpu)
            .contiguous()
            .view([-1]),
    )
    .unwrap_or_default();
    let keep = nms_sorted(&flat, &order, iou_threshold as f32);
    Tensor::from_slice(&keep).to_device(device)
}

/// The greedy loop over boxes already in score order; `flat` holds `x1 y1 x2 y2` per box.
fn nms_sorted(flat: &[f32], order: &[i64], threshold: f32) -> Vec<i64> {
    let n = flat.len() / 4;
    let area: Vec<f32> = (0..n)
        .map(|i| (flat[4 * i + 2] - flat[4 * i]) * (flat[4 * i + 3] - flat[4 * i + 1]))
        .collect();
    let mut suppressed = vec![false; n];
    let mut keep = Vec::new();
    for (pos, &i) in order.iter().enumerate() {
        let i = i as usize;
        if suppressed[i] {
            continue;
        }
        keep.push(i as i64);
        let (ix1, iy1, ix2, iy2) = (
            flat[4 * i],
            flat[4 * i + 1],
            flat[4 * i + 2],
            flat[4 * i + 3],
        );
        for &j in &order[pos + 1..] {
            let j = j as usize;
            if suppressed[j] {
                continue;
            }
            let w = (ix2.min(flat[4 * j + 2]) - ix1.max(flat[4 * j])).max(0.0);
            let h = (iy2.min(flat[4 * j + 3]) - iy1.max(flat[4 * j + 1])).max(0.0);
            let inter = w * h;
            let iou = inter / (area[i] + area[j] - inter);
            if iou > threshold {
                suppressed[j] = true;
            }
        }
    }
    keep
}

/// NMS within each category of `idxs`: boxes of different categories never suppress each
/// other. Kept indices come back by decreasing score, as `torchvision.ops.batched_nms`,
/// which (on the CPU) shifts categories apart for up to 1000 boxes and runs one NMS per
/// category above that; both are mirrored so that rounding matches too.
pub fn batched_nms(boxes: &Tensor, scores: &Tensor, idxs: &Tensor, iou_threshold: f64) -> Tensor {
    if boxes.numel() == 0 {
        return Tensor::zeros([0], (Kind::Int64, boxes.device()));
    }
    if boxes.numel() <= 4000 {
        let max_coordinate = boxes.max();
        let offsets = idxs.to_kind(boxes.kind()) * (max_coordinate + 1.0);
        let shifted = boxes + offsets.unsqueeze(1);
        return nms(&shifted, scores, iou_threshold);
    }
    let device = boxes.device();
    let cpu = |t: &Tensor| t.to_device(tch::Device::Cpu);
    let ids: Vec<i64> = Vec::<i64>::try_from(&cpu(&idxs.to_kind(Kind::Int64))).unwrap_or_default();
    let score_v: Vec<f32> =
        Vec::<f32>::try_from(&cpu(&scores.to_kind(Kind::Float))).unwrap_or_default();
    let mut categories = ids.clone();
    categories.sort_unstable();
    categories.dedup();
    let mut kept: Vec<i64> = Vec::new();
    for cat in categories {
        let members: Vec<i64> = ids
            .iter()
            .enumerate()
            .filter(|(_, &c)| c == cat)
            .map(|(i, _)| i as i64)
            .collect();
        let sel = Tensor::from_slice(&members).to_device(device);
        let keep = nms(
            &boxes.index_select(0, &sel),
            &scores.index_select(0, &sel),
            iou_threshold,
        );
        for k in Vec::<i64>::try_from(&cpu(&keep)).unwrap_or_default() {
            kept.push(members[k as usize]);
        }
    }
    // torchvision keeps a mask, so the kept indices go back to index order before sorting.
    kept.sort_unstable();
    kept.sort_by(|&a, &b| {
        score_v[b as usize]
            .partial_cmp(&score_v[a as usize])
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    Tensor::from_slice(&kept).to_device(device)
}

/// RoI align (`torchvision.ops.roi_align` with `aligned` false or true), differentiable in
/// `input`, on any device.
///
/// `input` is `[N, C, H, W]`; `rois` is `[K, 5]` with the batch index first. Each output bin
/// averages `sampling_ratio`² bilinear samples; a sample more than one pixel outside the map
/// counts as zero, one within a pixel of the border takes the border value, exactly as the
/// torchvision kernel does. A RoI naming an image outside the batch pools zeros.
///
/// Each bin is a weighted sum of 4·`sampling_ratio`² pixels (the bilinear taps of its
/// samples), so the whole operation is one `embedding_bag` over the map's pixels as rows of
/// `C` channels. libtorch runs that with all threads in both directions; its `grid_sampler`,
/// the obvious building block, parallelises over images only (one thread for a batch of one)
/// and always computes a gradient for the grid too — 4x to 7x slower here (README,
/// "Speed-ups").
pub fn roi_align(
    input: &Tensor,
    rois: &Tensor,
    output_size: (i64, i64),
    spatial_scale: f64,
    sampling_ratio: i64,
    aligned: bool,
) -> Tensor {
    let levels = Tensor::zeros([rois.size()[0]], (Kind::Int64, rois.device()));
    multi_level_roi_align(
        std::slice::from_ref(input),
        &[spatial_scale],
        &levels,
        rois,
        output_size,
        sampling_ratio,
        aligned,
    )
    .contiguous()
}

/// RoI align over several maps at once (a feature pyramid): RoI `i` pools from
/// `features[levels[i]]` at `scales[levels[i]]`, as [`roi_align`] would on that map alone.
///
/// One `embedding_bag` over the pixels of every level (their rows stacked in one table), so
/// the pooled rows come out in the RoIs' own order: no per-level result to scatter back.
/// The result is `[K, C, ph, pw]` laid out bins-outside, channels-inside (a permuted view of
/// a contiguous `[K, ph, pw, C]`), the bag's own order; a consumer that flattens it in
/// torchvision's `(C, ph, pw)` order pays one copy, one that permutes its weights instead
/// (the box head at inference, [`crate::roi_heads::TwoMlpHead`]) pays none. Every level
/// must have the same channels; a RoI whose level has no pixels pools zeros.
pub fn multi_level_roi_align(
    features: &[Tensor],
    scales: &[f64],
    levels: &Tensor,
    rois: &Tensor,
    output_size: (i64, i64),
    sampling_ratio: i64,
    aligned: bool,
) -> Tensor {
    let (ph, pw) = output_size;
    let k = rois.size()[0];
    let device = rois.device();
    let Some(first) = features.first() else {
        return Tensor::zeros([k, 0, ph, pw], (Kind::Float, device));
    };
    let c = first.size().get(1).copied().unwrap_or(0);
    let dims: Vec<(i64, i64, i64)> = features
        .iter()
        .map(|f| match f.size4() {
            Ok((n, _, h, w)) => (n, h, w),
            Err(_) => (0, 0, 0),
        })
        .collect();
    let rows: Vec<i64> = dims.iter().map(|&(n, h, w)| n * h * w).collect();
    let total: i64 = rows.iter().sum();
    if k == 0 || total == 0 || c == 0 {
        return Tensor::zeros([k, c, ph, pw], (first.kind(), device));
    }
    // The bag's weights take the table's type. f16 maps, and bf16 ones that need gradients
    // (mixed-precision training), pool in f32 and go back; bf16 maps at inference pool in
    // bf16 (the kernel sums in f32; the taps' weights round to bf16's 8 bits, as the maps'
    // values already have), which halves the bag's reads and skips two casts.
    let grad = features.iter().any(Tensor::requires_grad);
    let table_kind = match first.kind() {
        Kind::Double => Kind::Double,
        Kind::BFloat16 if !grad && features.iter().all(|f| f.kind() == Kind::BFloat16) => {
            Kind::BFloat16
        }
        _ => Kind::Float,
    };
    // One row per pixel, level after level. The bag kernel's fast (vectorised, threaded)
    // path needs unit-stride rows; a plain NCHW map's permuted reshape is a strided view
    // that falls to a serial loop 40x slower. Without gradients the rows are written in
    // place, cast and transposed in one pass.
    let as_rows = |f: &Tensor, r: i64| f.permute([0, 2, 3, 1]).reshape([r, c]);
    let table = if features.len() == 1 {
        as_rows(&first.to_kind(table_kind), total).contiguous()
    } else if grad {
        let parts: Vec<Tensor> = features
            .iter()
            .zip(&rows)
            .map(|(f, &r)| as_rows(&f.to_kind(table_kind), r))
            .collect();
        Tensor::cat(&parts, 0)
    } else {
        let table = Tensor::empty([total, c], (table_kind, device));
        let mut offset = 0;
        for (f, (&(n, h, w), &r)) in features.iter().zip(dims.iter().zip(&rows)) {
            if r > 0 {
                table
                    .narrow(0, offset, r)
                    .view([n, h, w, c])
                    .copy_(&f.permute([0, 2, 3, 1]));
            }
            offset += r;
        }
        table
    };
    // Each level's scale, map size, batch size and first row in the table.
    let mut level_list = Vec::with_capacity(rows.len());
    let mut at = 0;
    for ((&(n, h, w), &r), &scale) in dims.iter().zip(&rows).zip(scales) {
        level_list.push(Level {
            scale,
            n,
            h,
            w,
            start: at,
        });
        at += r;
    }
    let sr = sampling_ratio.max(1);
    // On the CPU the taps come from one loop over the RoIs: as some forty tensor operations
    // on a few hundred thousand taps they took 1.5 ms of the compact model's 20 ms.
    let cpu_taps = if device == tch::Device::Cpu {
        cpu_taps(rois, levels, &level_list, output_size, sr, aligned)
    } else {
        None
    };
    let (index, weight, offsets) = match cpu_taps {
        Some(taps) => taps,
        None => {
            let geometry = level_geometry(&level_list, levels, device);
            let (index, weight) = bilinear_taps(rois, &geometry, output_size, sr, aligned);
            let taps = 4 * sr * sr;
            let offsets =
                Tensor::arange_start_step(0, k * ph * pw * taps, taps, (Kind::Int64, device));
            (index, weight, offsets)
        }
    };
    let (pooled, _, _, _) = Tensor::embedding_bag(
        &table,
        &index,
        &offsets,
        false,
        0, // sum
        false,
        Some(weight.to_kind(table_kind)),
        false,
    );
    pooled
        .view([k, ph, pw, c])
        .permute([0, 3, 1, 2])
        .to_kind(first.kind())
}

/// One level of the pooled pyramid: its spatial scale, batch size and map size, and the
/// table row of its first pixel.
#[derive(Debug, Clone, Copy)]
struct Level {
    scale: f64,
    n: i64,
    h: i64,
    w: i64,
    start: i64,
}

/// Each RoI's [`Level`] as tensors, for [`bilinear_taps`].
fn level_geometry(list: &[Level], levels: &Tensor, device: tch::Device) -> LevelGeometry {
    let per_level = |values: Vec<f64>, kind: Kind| {
        Tensor::from_slice(&values)
            .to_kind(kind)
            .to_device(device)
            .index_select(0, levels)
    };
    let of = |f: fn(&Level) -> f64| list.iter().map(f).collect::<Vec<f64>>();
    LevelGeometry {
        scale: per_level(of(|l| l.scale), Kind::Float),
        h: per_level(of(|l| l.h as f64), Kind::Int64),
        w: per_level(of(|l| l.w as f64), Kind::Int64),
        n: per_level(of(|l| l.n as f64), Kind::Int64),
        start: per_level(of(|l| l.start as f64), Kind::Int64),
    }
}

/// The bins' taps computed in one loop on the host, as bags of different sizes: (table
/// rows, weights, each bin's first tap). A sample's bilinear weights are a product of one
/// weight per axis, so a bin's weight on pixel (y, x) is the sum over its row samples of
/// their weights on row y times the sum over its column samples of their weights on column x
/// (divided by the sr² samples). Summing per axis first merges the pixels that neighbouring
/// samples share (most, on the small RoIs of the finest level) and drops those outside the
/// map, so a bin takes 4 to 16 taps where [`bilinear_taps`] always takes 4·sr². The
/// positions follow [`bilinear_taps`] float operation for float operation; a unit test
/// compares the pooled results of the two. `None` when the RoIs or levels cannot be read
/// back (the caller then takes the tensor path). A RoI on an image outside the batch, on an
/// empty map or on a level outside the list pools zeros (empty bags).
fn cpu_taps(
    rois: &Tensor,
    levels: &Tensor,
    list: &[Level],
    (ph, pw): (i64, i64),
    sr: i64,
    aligned: bool,
) -> Option<(Tensor, Tensor, Tensor)> {
    let k = rois.size().first().copied().unwrap_or(0);
    let boxes = Vec::<f32>::try_from(rois.to_kind(Kind::Float).contiguous().view([-1])).ok()?;
    let levels = Vec::<i64>::try_from(levels.to_kind(Kind::Int64).contiguous().view([-1])).ok()?;
    let (ku, phu, pwu, sru) = (
        usize::try_from(k).ok()?,
        usize::try_from(ph).ok()?,
        usize::try_from(pw).ok()?,
        usize::try_from(sr).ok()?,
    );
    if boxes.len() != ku * 5 || levels.len() != ku {
        return None;
    }
    let bins = ku * phu * pwu;
    let mut index = Vec::with_capacity(bins * 6);
    let mut weight = Vec::with_capacity(bins * 6);
    let mut offsets = Vec::with_capacity(bins);
    let offset = if aligned { 0.5f32 } else { 0.0 };
    let samples = (sr * sr) as f32;
    // One axis of one RoI: per bin, its pixels with the summed weight of its samples on
    // each (`taps[starts[b]..starts[b + 1]]`), zero weights left out.
    struct Axis {
        taps: Vec<(i64, f32)>,
        starts: Vec<usize>,
    }
    let axis = |start: f32, extent: f32, bins: usize, size: i64, out: &mut Axis| {
        out.taps.clear();
        out.starts.clear();
        let size = size as f32;
        let last = size - 1.0;
        let bin = extent / bins as f32;
        for p in 0..bins {
            let first = out.taps.len();
            out.starts.push(first);
            for i in 0..sru {
                let pos = (start + p as f32 * bin) + ((i as f32 + 0.5) * bin) / sr as f32;
                if !(pos >= -1.0 && pos <= size) {
                    continue;
                }
                let pos = pos.max(0.0);
                let low = pos.floor();
                let interior = low < last;
                let low = low.min(last);
                let pos = if interior { pos } else { low };
                let high = if interior { low + 1.0 } else { low };
                let frac = pos - low;
                for (pixel, w) in [(low as i64, 1.0 - frac), (high as i64, frac)] {
                    if w == 0.0 {
                        continue;
                    }
                    match out.taps[first..].iter_mut().find(|t| t.0 == pixel) {
                        Some(t) => t.1 += w,
                        None => out.taps.push((pixel, w)),
                    }
                }
            }
        }
        out.starts.push(out.taps.len());
    };
    let mut ys = Axis {
        taps: Vec::new(),
        starts: Vec::new(),
    };
    let mut xs = Axis {
        taps: Vec::new(),
        starts: Vec::new(),
    };
    for (r, &level) in levels.iter().enumerate() {
        let b = &boxes[r * 5..r * 5 + 5];
        let g = usize::try_from(level).ok().and_then(|l| list.get(l));
        let image = b[0] as i64;
        let Some(g) = g.filter(|g| image >= 0 && image < g.n && g.h * g.w > 0) else {
            offsets.extend(std::iter::repeat_n(index.len() as i64, phu * pwu));
            continue;
        };
        let scale = g.scale as f32;
        let start_x = b[1] * scale - offset;
        let start_y = b[2] * scale - offset;
        let mut roi_w = b[3] * scale - offset - start_x;
        let mut roi_h = b[4] * scale - offset - start_y;
        if !aligned {
            roi_w = roi_w.max(1.0);
            roi_h = roi_h.max(1.0);
        }
        axis(start_y, roi_h, phu, g.h, &mut ys);
        axis(start_x, roi_w, pwu, g.w, &mut xs);
        let base = g.start + image * g.h * g.w;
        for by in 0..phu {
            let rows = &ys.taps[ys.starts[by]..ys.starts[by + 1]];
            for bx in 0..pwu {
                offsets.push(index.len() as i64);
                for &(y, wy) in rows {
                    for &(x, wx) in &xs.taps[xs.starts[bx]..xs.starts[bx + 1]] {
                        index.push(base + y * g.w + x);
                        weight.push(wy * wx / samples);
                    }
                }
            }
        }
    }
    Some((
        Tensor::from_slice(&index),
        Tensor::from_slice(&weight),
        Tensor::from_slice(&offsets),
    ))
}

/// Per RoI (`[K]` each): the spatial scale, height, width and batch size of its map, and the
/// table row of that map's first pixel.
struct LevelGeometry {
    scale: Tensor,
    h: Tensor,
    w: Tensor,
    n: Tensor,
    start: Tensor,
}

/// The bilinear taps of RoI align's samples: for every bin (RoI-major, then bin row and
/// column) 4·`sr`² (table row, weight) pairs, the weights already divided by the `sr`²
/// samples they average. Positions follow torchvision's kernel operation for operation, so
/// the results agree to rounding.
fn bilinear_taps(
    rois: &Tensor,
    g: &LevelGeometry,
    (ph, pw): (i64, i64),
    sr: i64,
    aligned: bool,
) -> (Tensor, Tensor) {
    let k = rois.size()[0];
    let device = rois.device();
    let f = (Kind::Float, device);
    let rois = rois.to_kind(Kind::Float);
    let offset = if aligned { 0.5 } else { 0.0 };
    let start_x = rois.select(1, 1) * &g.scale - offset;
    let start_y = rois.select(1, 2) * &g.scale - offset;
    let mut roi_w = rois.select(1, 3) * &g.scale - offset - &start_x;
    let mut roi_h = rois.select(1, 4) * &g.scale - offset - &start_y;
    if !aligned {
        roi_w = roi_w.clamp_min(1.0);
        roi_h = roi_h.clamp_min(1.0);
    }
    // One axis: sample positions [K, bins, sr] -> (low, high) pixel and weight, [K, bins, sr, 2].
    let axis = |start: &Tensor, extent: &Tensor, bins: i64, size: &Tensor| {
        let size = size.to_kind(Kind::Float).view([k, 1, 1]);
        let last = &size - 1.0;
        let bin = (extent / bins as f64).view([k, 1, 1]);
        let p = Tensor::arange(bins, f).view([1, bins, 1]);
        let i = (Tensor::arange(sr, f) + 0.5).view([1, 1, sr]);
        let pos = start.view([k, 1, 1]) + p * &bin + i * &bin / sr as f64;
        let inside = pos.ge(-1.0).logical_and(&pos.le_tensor(&size));
        let pos = pos.clamp_min(0.0);
        let low = pos.floor();
        let interior = low.lt_tensor(&last);
        let low = low.minimum(&last);
        let pos = pos.where_self(&interior, &low);
        let high = (&low + 1.0).where_self(&interior, &low);
        let frac = &pos - &low;
        let weights = Tensor::stack(&[frac.ones_like() - &frac, frac], 3)
            * inside.to_kind(Kind::Float).unsqueeze(3);
        let pixels = Tensor::stack(&[low, high], 3).to_kind(Kind::Int64);
        (pixels, weights)
    };
    let (ys, wy) = axis(&start_y, &roi_h, ph, &g.h);
    let (xs, wx) = axis(&start_x, &roi_w, pw, &g.w);
    let image = rois.select(1, 0).to_kind(Kind::Int64);
    // A RoI naming an image outside the batch (or on an empty map) pools zeros.
    let pixels = &g.h * &g.w;
    let valid = image
        .ge(0)
        .logical_and(&image.lt_tensor(&g.n))
        .logical_and(&pixels.gt(0));
    let image = image.minimum(&(&g.n - 1)).clamp_min(0);
    let shape = [k, 1, 1, 1, 1, 1, 1];
    let base = (&g.start + image * pixels).view(&shape[..]);
    // [K, ph, pw, sr_y, sr_x, corner_y, corner_x]
    let ys = ys.view(&[k, ph, 1, sr, 1, 2, 1][..]);
    let xs = xs.view(&[k, 1, pw, 1, sr, 1, 2][..]);
    let index = (base + ys * g.w.view(&shape[..]) + xs).reshape([-1]);
    let weight = (wy.view(&[k, ph, 1, sr, 1, 2, 1][..]) * wx.view(&[k, 1, pw, 1, sr, 1, 2][..])
        / (sr * sr) as f64)
        * valid.to_kind(Kind::Float).view(&shape[..]);
    (index, weight.reshape([-1]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::t;

    #[test]
    fn iou_of_known_boxes() {
        let a = t(&[0., 0., 10., 10.], 1);
        let b = t(&[5., 5., 15., 15., 20., 20., 30., 30.], 2);
        let iou = Vec::<f32>::try_from(&box_iou(&a, &b).view([-1])).unwrap();
        assert!((iou[0] - 25.0 / 175.0).abs() < 1e-6);
        assert_eq!(iou[1], 0.0);
    }

    #[test]
    fn nms_keeps_the_best_of_overlapping_boxes() {
        let boxes = t(
            &[
                0., 0., 10., 10., 1., 1., 11., 11., 20., 20., 30., 30., 0., 0., 10., 10.,
            ],
            4,
        );
        let scores = Tensor::from_slice(&[0.9f32, 0.95, 0.5, 0.3]);
        let keep = Vec::<i64>::try_from(&nms(&boxes, &scores, 0.5)).unwrap();
        assert_eq!(keep, vec![1, 2]);
    }

    #[test]
    fn batched_nms_keeps_categories_apart() {
        let boxes = t(&[0., 0., 10., 10., 0., 0., 10., 10.], 2);
        let scores = Tensor::from_slice(&[0.9f32, 0.8]);
        let idxs = Tensor::from_slice(&[1i64, 2]);
        let keep = Vec::<i64>::try_from(&batched_nms(&boxes, &scores, &idxs, 0.5)).unwrap();
        assert_eq!(keep, vec![0, 1]);
        let same = Tensor::from_slice(&[1i64, 1]);
        let keep = Vec::<i64>::try_from(&batched_nms(&boxes, &scores, &same, 0.5)).unwrap();
        assert_eq!(keep, vec![0]);
    }

    #[test]
    fn roi_align_of_a_constant_map_is_that_constant_inside() {
        let input = Tensor::full([1, 2, 8, 8], 3.0, (Kind::Float, tch::Device::Cpu));
        let rois = t(&[0., 1., 1., 6., 6.], 1);
        let out = roi_align(&input, &rois, (2, 2), 1.0, 2, false);
        assert_eq!(out.size(), vec![1, 2, 2, 2]);
        let v = Vec::<f32>::try_from(&out.view([-1])).unwrap();
        assert!(v.iter().all(|x| (x - 3.0).abs() < 1e-6), "{v:?}");
    }

    #[test]
    fn roi_align_of_a_ramp_samples_bin_centres() {
        // value = x, so each bin's mean is the mean x of its samples.
        let ramp = Tensor::arange(8, (Kind::Float, tch::Device::Cpu))
            .view([1, 1, 1, 8])
            .expand([1, 1, 8, 8], false)
            .contiguous();
        let rois = t(&[0., 0., 0., 4., 4.], 1);
        let out = roi_align(&ramp, &rois, (1, 2), 1.0, 2, false);
        let v = Vec::<f32>::try_from(&out.view([-1])).unwrap();
        // bin 0 samples x = 0.5, 1.5 -> 1.0; bin 1 samples x = 2.5, 3.5 -> 3.0
        assert!(
            (v[0] - 1.0).abs() < 1e-5 && (v[1] - 3.0).abs() < 1e-5,
            "{v:?}"
        );
    }

    #[test]
    fn roi_align_of_an_image_outside_the_batch_is_zero() {
        let input = Tensor::ones([1, 1, 4, 4], (Kind::Float, tch::Device::Cpu));
        let rois = t(&[0., 0., 0., 3., 3., 3., 0., 0., 3., 3.], 2);
        let out = roi_align(&input, &rois, (2, 2), 1.0, 2, false);
        let sums =
            Vec::<f32>::try_from(&out.sum_dim_intlist(&[1i64, 2, 3][..], false, Kind::Float))
                .unwrap();
        assert_eq!(sums, vec![4.0, 0.0]);
    }

    /// Two pyramid levels, each RoI pooled from its own: the one-bag result equals
    /// [`roi_align`] on that level alone, row for row, with and without gradients; a RoI on
    /// an image outside the batch pools zeros.
    #[test]
    fn multi_level_pooling_matches_each_level_alone() {
        let cpu = (Kind::Float, tch::Device::Cpu);
        let fine = Tensor::arange(2 * 3 * 8 * 8, cpu).view([2, 3, 8, 8]).sin();
        let coarse = Tensor::arange(2 * 3 * 4 * 4, cpu).view([2, 3, 4, 4]).cos();
        let scales = [1.0, 0.5];
        let rois = t(
            &[
                0., 1., 1., 6., 5., //
                1., 0., 2., 7., 7., //
                1., 2., 0., 5., 3., //
                0., 0.5, 0.5, 7.5, 6., //
                5., 1., 1., 4., 4., //
                0., -2., -2., 3., 9., //
            ],
            6,
        );
        let levels = Tensor::from_slice(&[0i64, 1, 0, 1, 1, 0]);
        let maps = [fine, coarse];
        for grad in [false, true] {
            let maps: Vec<Tensor> = maps
                .iter()
                .map(|m| m.detach().set_requires_grad(grad))
                .collect();
            let both = multi_level_roi_align(&maps, &scales, &levels, &rois, (3, 2), 2, false);
            assert_eq!(both.size(), vec![6, 3, 3, 2]);
            // Bins outside, channels inside.
            assert_eq!(both.stride(), vec![18, 1, 6, 3]);
            for i in 0..6i64 {
                let level = levels.int64_value(&[i]) as usize;
                let alone = roi_align(
                    &maps[level],
                    &rois.narrow(0, i, 1),
                    (3, 2),
                    scales[level],
                    2,
                    false,
                );
                let diff = (both.narrow(0, i, 1) - &alone)
                    .abs()
                    .max()
                    .double_value(&[]);
                assert!(diff < 1e-6, "RoI {i} (grad {grad}): {diff}");
            }
            let outside = both
                .narrow(0, 4, 1)
                .abs()
                .sum(Kind::Float)
                .double_value(&[]);
            assert_eq!(outside, 0.0, "the RoI on image 5 of 2");
        }
    }

    /// The host loop's merged bags pool what the tensor operations' fixed bags of 4·sr²
    /// taps (the path other devices take) pool, on RoIs inside, across and outside two
    /// levels' maps, both alignments and several sample counts; a RoI on an image outside
    /// the batch pools zeros. The merged bags are smaller.
    #[test]
    fn host_taps_pool_what_the_tensor_taps_pool() {
        let list = [
            Level {
                scale: 0.25,
                n: 2,
                h: 10,
                w: 12,
                start: 0,
            },
            Level {
                scale: 0.125,
                n: 2,
                h: 5,
                w: 6,
                start: 240,
            },
        ];
        tch::manual_seed(7);
        let cpu = (Kind::Float, tch::Device::Cpu);
        let table = Tensor::randn([240 + 60, 3], cpu);
        let k = 40;
        let xy = Tensor::rand([k, 2], cpu) * 60.0 - 8.0;
        let wh = Tensor::rand([k, 2], cpu) * 30.0;
        let image =
            Tensor::from_slice(&(0..k).map(|i| (i % 3) as f32).collect::<Vec<_>>()).view([k, 1]);
        let rois = Tensor::cat(&[image, xy.shallow_clone(), xy + wh], 1);
        let levels = Tensor::from_slice(&(0..k).map(|i| (i / 2) % 2).collect::<Vec<i64>>());
        let bag = |index: &Tensor, weight: &Tensor, offsets: &Tensor| {
            Tensor::embedding_bag(&table, index, offsets, false, 0, false, Some(weight), false).0
        };
        for (sr, aligned) in [(2, false), (1, true), (3, false), (2, true)] {
            let (hi, hw, ho) = cpu_taps(&rois, &levels, &list, (7, 5), sr, aligned).unwrap();
            let geometry = level_geometry(&list, &levels, tch::Device::Cpu);
            let (ti, tw) = bilinear_taps(&rois, &geometry, (7, 5), sr, aligned);
            let taps = 4 * sr * sr;
            let to =
                Tensor::arange_start_step(0, k * 35 * taps, taps, (Kind::Int64, tch::Device::Cpu));
            // Invalid taps of the tensor path name rows outside the table with weight 0.
            let ti = ti.clamp(0, 299);
            let merged = bag(&hi, &hw, &ho);
            let fixed = bag(&ti, &tw, &to);
            assert_eq!(merged.size(), vec![k * 35, 3]);
            let differ = (&merged - &fixed).abs().max().double_value(&[]);
            assert!(
                differ < 1e-5,
                "sr {sr}, aligned {aligned}: pooled values differ by {differ}"
            );
            assert!(
                hi.size()[0] < ti.size()[0],
                "{} taps, not fewer than {}",
                hi.size()[0],
                ti.size()[0]
            );
            // Image 2 of a batch of 2 pools zeros.
            let per_roi =
                merged
                    .view([k, -1])
                    .abs()
                    .sum_dim_intlist(&[1i64][..], false, Kind::Float);
            for r in (2..k).step_by(3) {
                assert_eq!(per_roi.double_value(&[r]), 0.0, "RoI {r}");
            }
        }
    }

    #[test]
    fn roi_align_far_outside_is_zero() {
        let input = Tensor::ones([1, 1, 4, 4], (Kind::Float, tch::Device::Cpu));
        let rois = t(&[0., 10., 10., 14., 14.], 1);
        let out = roi_align(&input, &rois, (2, 2), 1.0, 2, false);
        assert_eq!(out.abs().sum(Kind::Float).double_value(&[]), 0.0);
    }
}
