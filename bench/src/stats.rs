//! Median and range of a figure's samples.

/// What the report shows of a set of samples.
#[derive(Clone, Debug)]
pub(crate) struct Summary {
    /// What the table shows and the ratios divide.
    pub median: f64,
    /// The range, to judge the noise.
    pub min: f64,
    pub max: f64,
    /// Every sample in the order taken, for the JSON file.
    pub samples: Vec<f64>,
}

impl Summary {
    /// `None` when there is no sample (every attempt failed, or the figure does not apply).
    pub(crate) fn of(samples: &[f64]) -> Option<Self> {
        let mut sorted: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let mid = sorted.len() / 2;
        let median = if sorted.len() % 2 == 1 {
            sorted[mid]
        } else {
            (sorted[mid - 1] + sorted[mid]) / 2.0
        };
        Some(Self {
            median,
            min: sorted[0],
            max: sorted[sorted.len() - 1],
            samples: samples.to_vec(),
        })
    }
}

/// `a / b` of two medians, when both exist and `b` is not zero.
pub(crate) fn ratio(a: Option<&Summary>, b: Option<&Summary>) -> Option<f64> {
    let (a, b) = (a?, b?);
    (b.median != 0.0).then(|| a.median / b.median)
}
