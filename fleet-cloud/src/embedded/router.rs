//! Subscriptions and retained messages: a topic trie with MQTT's matching
//! rules, shared-subscription groups and per-client bookkeeping.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};

/// A topic filter's levels, checked: `+` and `#` fill a whole level and `#`
/// is last.
pub(super) fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.len() > 65_535 {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, l)| match *l {
        "#" => i == last,
        "+" => true,
        l => !l.contains(['+', '#']),
    })
}

/// A topic name: no wildcards, not empty, no NUL.
pub(super) fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

/// `$share/{group}/{filter}` split into its group and filter.
pub(super) fn split_shared(filter: &str) -> Option<(&str, &str)> {
    let rest = filter.strip_prefix("$share/")?;
    let (group, inner) = rest.split_once('/')?;
    (!group.is_empty() && !group.contains(['+', '#'])).then_some((group, inner))
}

pub(super) use crate::telemetry::topic_matches as matches;

#[derive(Default)]
struct Group {
    members: Vec<(String, u8)>,
    next: Cell<usize>,
}

#[derive(Default)]
struct Node {
    children: HashMap<String, Node>,
    /// Client id -> granted QoS.
    subscribers: HashMap<String, u8>,
    shared: BTreeMap<String, Group>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.subscribers.is_empty() && self.shared.is_empty()
    }
}

/// All subscriptions of the broker.
#[derive(Default)]
pub(super) struct Subscriptions {
    root: Node,
}

impl Subscriptions {
    /// Adds (or replaces) a subscription. `group`: a shared subscription.
    pub(super) fn insert(&mut self, client: &str, group: Option<&str>, filter: &str, qos: u8) {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.children.entry(level.to_owned()).or_default();
        }
        match group {
            None => {
                node.subscribers.insert(client.to_owned(), qos);
            }
            Some(g) => {
                let group = node.shared.entry(g.to_owned()).or_default();
                match group.members.iter_mut().find(|(c, _)| c == client) {
                    Some(m) => m.1 = qos,
                    None => group.members.push((client.to_owned(), qos)),
                }
            }
        }
    }

    /// Removes a subscription; whether it existed.
    pub(super) fn remove(&mut self, client: &str, group: Option<&str>, filter: &str) -> bool {
        fn walk(node: &mut Node, levels: &[&str], client: &str, group: Option<&str>) -> bool {
            match levels.split_first() {
                None => match group {
                    None => node.subscribers.remove(client).is_some(),
                    Some(g) => {
                        let Some(grp) = node.shared.get_mut(g) else {
                            return false;
                        };
                        let before = grp.members.len();
                        grp.members.retain(|(c, _)| c != client);
                        let removed = grp.members.len() != before;
                        if grp.members.is_empty() {
                            node.shared.remove(g);
                        }
                        removed
                    }
                },
                Some((first, rest)) => {
                    let Some(child) = node.children.get_mut(*first) else {
                        return false;
                    };
                    let removed = walk(child, rest, client, group);
                    if child.is_empty() {
                        node.children.remove(*first);
                    }
                    removed
                }
            }
        }
        let levels: Vec<&str> = filter.split('/').collect();
        walk(&mut self.root, &levels, client, group)
    }

    /// Whether `client` holds a (non-shared) subscription matching `topic`.
    pub(super) fn subscribed(&self, client: &str, topic: &str) -> bool {
        self.matching(topic)
            .iter()
            .any(|n| n.subscribers.contains_key(client))
    }

    fn matching(&self, topic: &str) -> Vec<&Node> {
        let levels: Vec<&str> = topic.split('/').collect();
        let mut nodes = Vec::new();
        collect(
            &self.root,
            &levels,
            true,
            topic.starts_with('$'),
            &mut nodes,
        );
        nodes
    }

    /// The clients a message on `topic` goes to, each with the highest QoS
    /// it subscribed with; one member of each matching shared group, in
    /// turn.
    pub(super) fn recipients(&self, topic: &str) -> HashMap<&str, u8> {
        let mut out: HashMap<&str, u8> = HashMap::new();
        for node in self.matching(topic) {
            for (client, qos) in &node.subscribers {
                let e = out.entry(client.as_str()).or_insert(*qos);
                *e = (*e).max(*qos);
            }
            for group in node.shared.values() {
                if group.members.is_empty() {
                    continue;
                }
                let i = group.next.get() % group.members.len();
                group.next.set(i + 1);
                let (client, qos) = &group.members[i];
                let e = out.entry(client.as_str()).or_insert(*qos);
                *e = (*e).max(*qos);
            }
        }
        out
    }
}

/// The nodes whose subscribers a message on `levels` reaches.
fn collect<'a>(
    node: &'a Node,
    levels: &[&str],
    first: bool,
    dollar: bool,
    out: &mut Vec<&'a Node>,
) {
    match levels.split_first() {
        None => {
            out.push(node);
            if let Some(h) = node.children.get("#") {
                out.push(h);
            }
        }
        Some((level, rest)) => {
            if let Some(c) = node.children.get(*level) {
                collect(c, rest, false, dollar, out);
            }
            if first && dollar {
                return;
            }
            if let Some(c) = node.children.get("+") {
                collect(c, rest, false, dollar, out);
            }
            if let Some(h) = node.children.get("#") {
                out.push(h);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_follows_mqtt() {
        assert!(matches("a/+/c", "a/b/c"));
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(!matches("#", "$aws/things/t/shadow/get"));
        assert!(!matches(
            "+/things/t/shadow/get",
            "$aws/things/t/shadow/get"
        ));
        assert!(matches(
            "$aws/things/+/shadow/get",
            "$aws/things/t/shadow/get"
        ));
        assert!(valid_filter("a/+/#"));
        assert!(!valid_filter("a/#/b"));
        assert!(!valid_filter("a/b+"));
        assert!(!valid_filter(""));
        assert!(!valid_topic("a/+"));
        assert_eq!(split_shared("$share/g/a/+"), Some(("g", "a/+")));
        assert_eq!(split_shared("$share//a"), None);
    }

    #[test]
    fn the_trie_agrees_with_the_matcher() {
        let filters = [
            "a/b", "a/+", "a/#", "#", "+/b", "$aws/#", "$aws/+/x", "+", "a/b/#",
        ];
        let topics = ["a/b", "a", "a/b/c", "$aws/t/x", "b/b", "x", "$aws"];
        let mut subs = Subscriptions::default();
        for (i, f) in filters.iter().enumerate() {
            subs.insert(&format!("c{i}"), None, f, 1);
        }
        for t in topics {
            let got = subs.recipients(t);
            for (i, f) in filters.iter().enumerate() {
                assert_eq!(
                    got.contains_key(format!("c{i}").as_str()),
                    matches(f, t),
                    "{f} {t}"
                );
            }
        }
        for (i, f) in filters.iter().enumerate() {
            assert!(subs.remove(&format!("c{i}"), None, f));
        }
        assert!(subs.root.is_empty());
    }

    #[test]
    fn a_shared_group_takes_turns() {
        let mut subs = Subscriptions::default();
        subs.insert("s1", Some("g"), "$aws/things/+/shadow/update", 1);
        subs.insert("s2", Some("g"), "$aws/things/+/shadow/update", 1);
        subs.insert("mon", None, "$aws/things/+/shadow/update", 0);
        let t = "$aws/things/t/shadow/update";
        let a = subs.recipients(t);
        let b = subs.recipients(t);
        assert_eq!(a.len(), 2);
        assert!(a.contains_key("mon") && b.contains_key("mon"));
        assert_ne!(a.contains_key("s1"), b.contains_key("s1"));
        assert!(subs.remove("s1", Some("g"), "$aws/things/+/shadow/update"));
        assert!(subs.recipients(t).contains_key("s2"));
    }
}
