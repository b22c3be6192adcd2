//! Latency histograms (HDR, microseconds) that cross process boundaries exactly: each worker
//! serializes its histograms with hdrhistogram's V2 format (base64 in the JSON it reports), and
//! the parent adds them bucket by bucket. Merged percentiles are therefore the percentiles of
//! every sample, not an average of per-worker percentiles.

use anyhow::{anyhow, Result};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Largest latency a histogram records, in microseconds (one hour); longer values are clamped
/// to it. With 3 significant digits a histogram is about 60 KiB in memory.
pub const LATENCY_US_MAX: u64 = 3_600_000_000;

/// Significant decimal digits kept: values are exact to 0.1 %.
pub const SIGNIFICANT_DIGITS: u8 = 3;

/// A new latency histogram (microseconds).
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, SIGNIFICANT_DIGITS)
        .unwrap_or_else(|_| unreachable!("constant bounds are valid"))
}

/// Records `us` microseconds, clamped to the histogram's range.
pub fn record_us(h: &mut Histogram<u64>, us: u64) {
    h.saturating_record(us.clamp(1, LATENCY_US_MAX));
}

/// The V2 serialization of `h`, base64-encoded.
pub fn encode(h: &Histogram<u64>) -> Result<String> {
    let mut buf = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut buf)
        .map_err(|e| anyhow!("serialize histogram: {e:?}"))?;
    Ok(BASE64.encode(buf))
}

/// The histogram [`encode`] made.
pub fn decode(text: &str) -> Result<Histogram<u64>> {
    let bytes = BASE64.decode(text)?;
    let h: Histogram<u64> = Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| anyhow!("deserialize histogram: {e:?}"))?;
    Ok(h)
}

/// Adds every encoded histogram into one.
pub fn merge_encoded<'a>(parts: impl IntoIterator<Item = &'a str>) -> Result<Histogram<u64>> {
    let mut total = new_histogram();
    for p in parts {
        total
            .add(decode(p)?)
            .map_err(|e| anyhow!("merge histogram: {e:?}"))?;
    }
    Ok(total)
}

/// The percentiles every report shows, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    /// Samples behind the figures.
    pub count: u64,
}

impl Percentiles {
    /// `None` for an empty histogram.
    pub fn of(h: &Histogram<u64>) -> Option<Percentiles> {
        if h.is_empty() {
            return None;
        }
        let ms = |us: u64| (us as f64 / 1000.0 * 1000.0).round() / 1000.0;
        Some(Percentiles {
            p50: ms(h.value_at_quantile(0.50)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            count: h.len(),
        })
    }
}

/// One interval of a run's time series, as a worker reports it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IntervalReport {
    /// Messages (or connections, for connection scenarios) completed in the interval.
    pub delivered: u64,
    /// Acknowledgements received in the interval.
    pub acked: u64,
    /// Latency of what completed in the interval, encoded with [`encode`]; empty when none.
    pub latency: String,
}

/// One interval of the merged time series.
#[derive(Debug, Clone, Serialize)]
pub struct SeriesPoint {
    /// End of the interval, seconds from the start of the measured phase.
    pub t_s: f64,
    pub delivered_per_s: f64,
    pub acked_per_s: f64,
    pub latency_ms: Option<Percentiles>,
}

/// Merges the per-worker series (same interval length, index = interval) exactly.
pub fn merge_series(workers: &[Vec<IntervalReport>], interval_s: f64) -> Result<Vec<SeriesPoint>> {
    let len = workers.iter().map(Vec::len).max().unwrap_or(0);
    let mut out = Vec::with_capacity(len);
    for i in 0..len {
        let mut delivered = 0;
        let mut acked = 0;
        let mut parts = Vec::new();
        for w in workers {
            if let Some(r) = w.get(i) {
                delivered += r.delivered;
                acked += r.acked;
                if !r.latency.is_empty() {
                    parts.push(r.latency.as_str());
                }
            }
        }
        let h = merge_encoded(parts)?;
        out.push(SeriesPoint {
            t_s: (i + 1) as f64 * interval_s,
            delivered_per_s: delivered as f64 / interval_s,
            acked_per_s: acked as f64 / interval_s,
            latency_ms: Percentiles::of(&h),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_histograms_equal_one_histogram_of_every_sample() {
        let mut all = new_histogram();
        let mut parts = Vec::new();
        for worker in 0..4u64 {
            let mut h = new_histogram();
            for i in 0..10_000u64 {
                // Different shapes per worker, including a far outlier.
                let v = 100
                    + (i * (worker + 1) * 7919) % 50_000
                    + if i == 9_999 { worker * 1_000_000 } else { 0 };
                record_us(&mut h, v);
                record_us(&mut all, v);
            }
            parts.push(encode(&h).unwrap());
        }
        let merged = merge_encoded(parts.iter().map(String::as_str)).unwrap();
        assert_eq!(merged.len(), all.len());
        assert_eq!(merged.max(), all.max());
        assert_eq!(merged.min(), all.min());
        for q in [0.0, 0.5, 0.9, 0.99, 0.999, 0.9999, 1.0] {
            assert_eq!(
                merged.value_at_quantile(q),
                all.value_at_quantile(q),
                "q={q}"
            );
        }
        assert_eq!(Percentiles::of(&merged), Percentiles::of(&all));
    }

    #[test]
    fn encoding_round_trips_and_clamps() {
        let mut h = new_histogram();
        record_us(&mut h, 0);
        record_us(&mut h, u64::MAX);
        let back = decode(&encode(&h).unwrap()).unwrap();
        assert_eq!(back.len(), 2);
        assert!(back.max() >= LATENCY_US_MAX);
        assert!(decode("not base64!").is_err());
    }

    #[test]
    fn series_merge_sums_counts_and_merges_latency() {
        let mut a = new_histogram();
        record_us(&mut a, 1000);
        let mut b = new_histogram();
        record_us(&mut b, 3000);
        let w1 = vec![IntervalReport {
            delivered: 10,
            acked: 5,
            latency: encode(&a).unwrap(),
        }];
        let w2 = vec![
            IntervalReport {
                delivered: 20,
                acked: 5,
                latency: encode(&b).unwrap(),
            },
            IntervalReport {
                delivered: 1,
                acked: 0,
                latency: String::new(),
            },
        ];
        let s = merge_series(&[w1, w2], 0.5).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].delivered_per_s, 60.0);
        assert_eq!(s[0].latency_ms.unwrap().count, 2);
        assert!((s[0].latency_ms.unwrap().max - 3.0).abs() < 0.01);
        assert!(s[1].latency_ms.is_none());
    }
}
