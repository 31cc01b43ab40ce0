//! The three ways a client's connection can reach the origin.

/// Who (if anyone) intercepts the load generator's connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Contender {
    /// No interception: the baseline.
    Direct,
    /// The eBPF programs on the client's cgroup and the transproxy daemon.
    Transproxy,
    /// An iptables REDIRECT rule for the client's cgroup and redsocks (`http-connect`).
    Redsocks,
}

impl Contender {
    /// In report order.
    pub(crate) const ALL: [Contender; 3] = [
        Contender::Direct,
        Contender::Transproxy,
        Contender::Redsocks,
    ];

    /// The name in the report, the JSON file and cgroup names.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Contender::Direct => "direct",
            Contender::Transproxy => "transproxy",
            Contender::Redsocks => "redsocks",
        }
    }

    /// Position in [`Contender::ALL`], for per-contender arrays.
    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// Every contender once, starting at a different one each repetition, so none always
    /// runs right after the same other one.
    pub(crate) fn rotation(repetition: usize) -> [Contender; 3] {
        let mut order = Self::ALL;
        order.rotate_left(repetition % Self::ALL.len());
        order
    }
}
