//! Every sample taken, and every problem met, in one place for the report.

use std::collections::BTreeMap;

use crate::{
    auth::AuthScheme, contender::Contender, figure::Figure, stats::Summary, upstream::Upstream,
};

/// Samples by upstream, figure and contender, plus notes on failed or imperfect measurements.
#[derive(Default)]
pub(crate) struct Results {
    samples: BTreeMap<(Upstream, Figure, Contender), Vec<f64>>,
    /// transproxy through squid asking for each authentication scheme.
    auth: BTreeMap<(AuthScheme, Figure), Vec<f64>>,
    /// Failed or imperfect measurements and adjustments, listed under the tables.
    pub notes: Vec<String>,
}

impl Results {
    /// Adds one sample.
    pub(crate) fn record(
        &mut self,
        upstream: Upstream,
        figure: Figure,
        contender: Contender,
        value: f64,
    ) {
        self.samples
            .entry((upstream, figure, contender))
            .or_default()
            .push(value);
    }

    /// Adds one sample of the authentication section.
    pub(crate) fn record_auth(&mut self, scheme: AuthScheme, figure: Figure, value: f64) {
        self.auth.entry((scheme, figure)).or_default().push(value);
    }

    /// Median and range of one cell of the authentication section.
    pub(crate) fn auth_summary(&self, scheme: AuthScheme, figure: Figure) -> Option<Summary> {
        Summary::of(self.auth.get(&(scheme, figure))?)
    }

    /// Whether the authentication section measured anything.
    pub(crate) fn has_auth(&self) -> bool {
        !self.auth.is_empty()
    }

    /// Adds a line to the report's notes.
    pub(crate) fn note(&mut self, note: String) {
        self.notes.push(note);
    }

    /// Median and range of one cell of the report.
    pub(crate) fn summary(
        &self,
        upstream: Upstream,
        figure: Figure,
        contender: Contender,
    ) -> Option<Summary> {
        Summary::of(self.samples.get(&(upstream, figure, contender))?)
    }

    /// Whether the figure was measured at all in this upstream's run.
    pub(crate) fn has(&self, upstream: Upstream, figure: Figure) -> bool {
        Contender::ALL
            .iter()
            .any(|c| self.samples.contains_key(&(upstream, figure, *c)))
    }
}
