//! Per-container upstreams (`[[container]]` in the config file): the processes of some child
//! cgroups (a pod's, a container's) tunnel through proxies of their own, with credentials of
//! their own.
//!
//! The kernel records each connection's cgroup id; the tunnel looks up which section applies
//! once per cgroup (a walk of the daemon's cgroup tree to find the id's path) and remembers it:
//! cgroup ids are never reused while the machine runs.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::RwLock,
};

use crate::upstream::Upstream;

/// At most this many cgroups' choices are remembered; past it the memory starts over.
const REMEMBERED: usize = 65_536;

/// The `[[container]]` sections' upstreams, in file order.
pub(crate) struct ContainerUpstreams {
    /// The daemon's cgroup directory: patterns are below it.
    tree: PathBuf,
    sections: Vec<(glob::Pattern, Upstream)>,
    /// cgroup id to the section that applies (`None`: the daemon's own upstream).
    chosen: RwLock<HashMap<u64, Option<usize>>>,
}

impl ContainerUpstreams {
    pub(crate) fn new(tree: &Path, sections: Vec<(glob::Pattern, Upstream)>) -> Self {
        Self {
            tree: tree.to_path_buf(),
            sections,
            chosen: RwLock::new(HashMap::new()),
        }
    }

    /// The upstreams of the section for cgroup `id`, if one applies. The first time an id is
    /// seen this walks the tree (blocking, a few milliseconds for thousands of cgroups).
    pub(crate) fn for_cgroup(&self, id: u64) -> Option<&Upstream> {
        if self.sections.is_empty() {
            return None;
        }
        let known = self.chosen.read().ok().and_then(|c| c.get(&id).copied());
        let index = match known {
            Some(index) => index,
            None => {
                let index =
                    crate::kernel::cgroup::path_below(&self.tree, id).and_then(|relative| {
                        section_for(self.sections.iter().map(|(p, _)| p), &relative)
                    });
                if let Ok(mut chosen) = self.chosen.write() {
                    if chosen.len() >= REMEMBERED {
                        chosen.clear();
                    }
                    chosen.insert(id, index);
                }
                index
            }
        };
        index.and_then(|i| self.sections.get(i)).map(|(_, u)| u)
    }
}

/// The section for a cgroup at `relative` (below the tree): the deepest of it and its
/// ancestors that a pattern matches wins; among patterns matching it, the first in the file.
/// `*` stays within one folder name.
fn section_for<'a>(
    patterns: impl Iterator<Item = &'a glob::Pattern> + Clone,
    relative: &Path,
) -> Option<usize> {
    let options = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: false,
    };
    relative.ancestors().find_map(|cgroup| {
        patterns
            .clone()
            .position(|pattern| pattern.matches_path_with(cgroup, options))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deepest_matching_cgroup_wins_then_the_first_pattern() {
        let patterns: Vec<glob::Pattern> = [
            "kubepods/*",
            "kubepods/pod-a",
            "libpod_parent/libpod-*",
            "kubepods/pod-a/*",
        ]
        .iter()
        .map(|p| glob::Pattern::new(p).unwrap())
        .collect();
        let choose = |path: &str| section_for(patterns.iter(), Path::new(path));
        // A pod's cgroup: two patterns match it, the first in the file wins.
        assert_eq!(choose("kubepods/pod-a"), Some(0));
        // A container below it: its own cgroup matches the fourth, deeper than the pod's.
        assert_eq!(choose("kubepods/pod-a/ctr-1"), Some(3));
        // Deeper still, inside the container: its nearest matching ancestor.
        assert_eq!(choose("kubepods/pod-a/ctr-1/inner"), Some(3));
        assert_eq!(choose("kubepods/pod-b/ctr-2"), Some(0));
        // `*` does not cross a folder.
        assert_eq!(choose("libpod_parent/libpod-abc"), Some(2));
        assert_eq!(choose("libpod_parent"), None);
        assert_eq!(choose("other/libpod-abc"), None);
    }
}
