//! The connectors of each site and the choice of one for a new flow (sans-IO).
//!
//! Every live QUIC link from a connector is one entry. A new flow goes to a *healthy*
//! connector of its application's site: linked, not draining, answering (not stale), and able
//! to reach the application by its own checks; among those, the one with the fewest open flows.
//! A flow keeps its connector for its whole life (the connector's NAT holds its state); only
//! when that connector's link is gone is the flow given another one.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

pub use crate::link::LinkId;

/// A link's state, as the metrics and the stats show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    Up,
    /// The connector asked for no new flows (it is being stopped or upgraded).
    Draining,
    /// Nothing heard from the connector lately; no new flows until it answers again.
    Stale,
}

impl LinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Up => "up",
            LinkState::Draining => "draining",
            LinkState::Stale => "stale",
        }
    }
}

#[derive(Debug)]
struct Link {
    site: String,
    name: String,
    draining: bool,
    /// Its connector is one an admin drained (kept in step with the pool's `held` names, so a
    /// lookup of a link never compares names).
    held: bool,
    stale: bool,
    unreachable: BTreeSet<String>,
    flows: usize,
    /// The largest QUIC datagram the link carries now (unknown: no limit known).
    max_datagram: Option<usize>,
}

impl Link {
    /// Whether it takes no new flows: its connector drains, or an admin drained it.
    fn closed(&self) -> bool {
        self.draining || self.held
    }
}

/// A link as reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LinkInfo {
    pub id: LinkId,
    pub site: String,
    pub connector: String,
    pub state: LinkState,
    /// Open flows through it (as of the last count, plus flows given to it since).
    pub flows: usize,
    pub unreachable: Vec<String>,
    /// Drained by an admin (no new flows until resumed), whatever the connector says.
    pub held: bool,
}

#[derive(Debug, Default)]
pub struct ConnectorPool {
    links: BTreeMap<LinkId, Link>,
    /// Breaks ties between equally loaded connectors in turn.
    turn: usize,
    /// Connectors an admin drained, by name: their links take no new flows, open ones go on.
    held: BTreeSet<String>,
}

impl ConnectorPool {
    /// A connector of `site` linked.
    pub fn up(&mut self, id: LinkId, site: &str, connector: &str) {
        self.links.insert(
            id,
            Link {
                site: site.to_string(),
                name: connector.to_string(),
                draining: false,
                held: self.held.contains(connector),
                stale: false,
                unreachable: BTreeSet::new(),
                flows: 0,
                max_datagram: None,
            },
        );
    }

    /// A link closed; its flows will be given other connectors. Returns its connector's name.
    pub fn down(&mut self, id: LinkId) -> Option<String> {
        self.links.remove(&id).map(|l| l.name)
    }

    pub fn contains(&self, id: LinkId) -> bool {
        self.links.contains_key(&id)
    }

    /// Whether the link would get new flows now (live, answering, not draining).
    pub fn takes_new(&self, id: LinkId) -> bool {
        self.links.get(&id).is_some_and(|l| !l.stale && !l.closed())
    }

    /// The connectors an admin drained (all of them, by name); true when that changed.
    pub fn set_held(&mut self, names: BTreeSet<String>) -> bool {
        if self.held == names {
            return false;
        }
        for l in self.links.values_mut() {
            l.held = names.contains(&l.name);
        }
        self.held = names;
        true
    }

    /// The connector's own report; true when something changed.
    pub fn set_health(&mut self, id: LinkId, draining: bool, unreachable: &[String]) -> bool {
        let Some(l) = self.links.get_mut(&id) else {
            return false;
        };
        let unreachable: BTreeSet<String> = unreachable.iter().cloned().collect();
        let changed = l.draining != draining || l.unreachable != unreachable;
        l.draining = draining;
        l.unreachable = unreachable;
        changed
    }

    /// Whether the broker has heard from the link lately; true when that changed.
    pub fn set_stale(&mut self, id: LinkId, stale: bool) -> bool {
        match self.links.get_mut(&id) {
            Some(l) if l.stale != stale => {
                l.stale = stale;
                true
            }
            _ => false,
        }
    }

    /// A connector of `site` for a new flow to `app`, or None when the site has no live link
    /// that takes new flows. Preference: healthy links; then links whose checks say the
    /// application is unreachable (they may still be right more often than nothing); then
    /// stale ones. Draining links never get new flows. Among equals: fewest open flows, ties in
    /// turn.
    pub fn pick(&mut self, site: &str, app: &str) -> Option<LinkId> {
        let tier = |l: &Link| -> Option<u8> {
            if l.site != site || l.closed() {
                None
            } else if l.stale {
                Some(2)
            } else if l.unreachable.contains(app) {
                Some(1)
            } else {
                Some(0)
            }
        };
        let best = self.links.values().filter_map(tier).min()?;
        let least = self
            .links
            .values()
            .filter(|l| tier(l) == Some(best))
            .map(|l| l.flows)
            .min()?;
        let candidates: Vec<LinkId> = self
            .links
            .iter()
            .filter(|(_, l)| tier(l) == Some(best) && l.flows == least)
            .map(|(id, _)| *id)
            .collect();
        let id = candidates[self.turn % candidates.len()];
        self.turn = self.turn.wrapping_add(1);
        if let Some(l) = self.links.get_mut(&id) {
            l.flows += 1;
        }
        Some(id)
    }

    /// Sets every link's open-flow count from the links of the open flows.
    pub fn recount(&mut self, open: impl Iterator<Item = LinkId>) {
        for l in self.links.values_mut() {
            l.flows = 0;
        }
        for id in open {
            if let Some(l) = self.links.get_mut(&id) {
                l.flows += 1;
            }
        }
    }

    /// The link carries QUIC datagrams of at most `max` bytes now.
    pub fn set_max_datagram(&mut self, id: LinkId, max: usize) {
        if let Some(l) = self.links.get_mut(&id) {
            l.max_datagram = Some(max);
        }
    }

    /// The largest packet the link takes now, when known.
    pub fn max_datagram(&self, id: LinkId) -> Option<usize> {
        self.links.get(&id).and_then(|l| l.max_datagram)
    }

    /// The connector name and site of a link.
    pub fn describe(&self, id: LinkId) -> Option<(&str, &str)> {
        self.links
            .get(&id)
            .map(|l| (l.name.as_str(), l.site.as_str()))
    }

    pub fn links(&self) -> Vec<LinkInfo> {
        self.links
            .iter()
            .map(|(id, l)| LinkInfo {
                id: *id,
                site: l.site.clone(),
                connector: l.name.clone(),
                state: if l.closed() {
                    LinkState::Draining
                } else if l.stale {
                    LinkState::Stale
                } else {
                    LinkState::Up
                },
                flows: l.flows,
                unreachable: l.unreachable.iter().cloned().collect(),
                held: l.held,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pool() -> ConnectorPool {
        let mut p = ConnectorPool::default();
        p.up(LinkId(1), "dc1", "c1");
        p.up(LinkId(2), "dc1", "c2");
        p.up(LinkId(3), "lab", "c3");
        p
    }

    #[test]
    fn new_flows_are_balanced_by_open_flows_within_the_site() {
        let mut p = pool();
        let picks: Vec<LinkId> = (0..6).map(|_| p.pick("dc1", "wiki").unwrap()).collect();
        assert_eq!(picks.iter().filter(|&&i| i == LinkId(1)).count(), 3);
        assert_eq!(picks.iter().filter(|&&i| i == LinkId(2)).count(), 3);
        assert_eq!(p.pick("lab", "x"), Some(LinkId(3)));
        assert_eq!(p.pick("nowhere", "x"), None);
        // Flows that ended on link 1 make it the less loaded one.
        p.recount([2, 2, 2, 1].into_iter().map(LinkId));
        assert_eq!(p.pick("dc1", "wiki"), Some(LinkId(1)));
        assert_eq!(p.pick("dc1", "wiki"), Some(LinkId(1)));
    }

    #[test]
    fn connectors_an_admin_drained_get_no_new_flows_until_resumed() {
        let mut p = pool();
        assert!(p.set_held(["c1".to_string()].into()));
        assert!(!p.set_held(["c1".to_string()].into()), "no change");
        for _ in 0..4 {
            assert_eq!(p.pick("dc1", "wiki"), Some(LinkId(2)));
        }
        assert!(!p.takes_new(LinkId(1)) && p.takes_new(LinkId(2)));
        let l1 = p.links().into_iter().find(|l| l.id == LinkId(1)).unwrap();
        assert_eq!((l1.state, l1.held), (LinkState::Draining, true));
        // A new link of a drained connector is drained too (it is held by name).
        p.down(LinkId(1));
        p.up(LinkId(9), "dc1", "c1");
        assert!(!p.takes_new(LinkId(9)));
        // Every connector of the site drained: nothing takes new flows there.
        p.set_held(["c1".to_string(), "c2".to_string()].into());
        assert_eq!(p.pick("dc1", "wiki"), None);
        p.set_held(BTreeSet::new());
        assert!(p.takes_new(LinkId(9)));
    }

    #[test]
    fn draining_stale_and_unreachable_links_are_avoided() {
        let mut p = pool();
        assert!(p.set_health(LinkId(1), true, &[]));
        assert!(!p.set_health(LinkId(1), true, &[]));
        for _ in 0..4 {
            assert_eq!(p.pick("dc1", "wiki"), Some(LinkId(2)));
        }
        // The only other link drains too: no new flows at all.
        p.set_health(LinkId(2), true, &[]);
        assert_eq!(p.pick("dc1", "wiki"), None);
        p.set_health(LinkId(1), false, &["wiki".to_string()]);
        p.set_health(LinkId(2), false, &[]);
        assert!(p.set_stale(LinkId(2), true));
        // Unreachable beats stale; for another app link 1 is healthy.
        assert_eq!(p.pick("dc1", "wiki"), Some(LinkId(1)));
        assert_eq!(p.pick("dc1", "git"), Some(LinkId(1)));
        assert!(p.set_stale(LinkId(2), false));
        assert_eq!(p.pick("dc1", "wiki"), Some(LinkId(2)));
        // A link that went down is gone.
        assert_eq!(p.down(LinkId(2)).as_deref(), Some("c2"));
        assert!(!p.contains(LinkId(2)));
        assert_eq!(p.pick("dc1", "wiki"), Some(LinkId(1)));
        let info = p.links();
        assert_eq!(info.len(), 2);
        assert_eq!(info[0].unreachable, vec!["wiki".to_string()]);
    }

    proptest! {
        /// Whatever happened before, a pick is a live, non-draining link of the site, and
        /// when a healthy one exists it is healthy and among the least loaded of the healthy.
        #[test]
        fn picks_respect_health_and_load(
            ops in proptest::collection::vec((0u8..6, 1u64..5, any::<bool>()), 0..60)
        ) {
            let mut p = ConnectorPool::default();
            for (op, id, flag) in ops {
                match op {
                    0 => p.up(LinkId(id), if id % 2 == 0 { "a" } else { "b" }, "c"),
                    1 => { p.down(LinkId(id)); }
                    2 => { p.set_health(LinkId(id), flag, &[]); }
                    3 => { p.set_stale(LinkId(id), flag); }
                    4 => { p.set_health(LinkId(id), false, &["app".to_string()]); }
                    _ => {
                        let before = p.links();
                        if let Some(got) = p.pick("a", "app") {
                            let l = before.iter().find(|l| l.id == got).unwrap();
                            prop_assert_eq!(&l.site, "a");
                            prop_assert!(l.state != LinkState::Draining);
                            let healthy: Vec<&LinkInfo> = before.iter().filter(|l| {
                                l.site == "a" && l.state == LinkState::Up
                                    && !l.unreachable.contains(&"app".to_string())
                            }).collect();
                            if !healthy.is_empty() {
                                prop_assert!(healthy.iter().any(|h| h.id == got));
                                let least = healthy.iter().map(|h| h.flows).min().unwrap();
                                prop_assert_eq!(l.flows, least);
                            }
                        } else {
                            prop_assert!(!before.iter().any(|l| l.site == "a"
                                && l.state != LinkState::Draining));
                        }
                    }
                }
            }
        }
    }
}
