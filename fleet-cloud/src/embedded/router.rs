//! Subscriptions and retained messages: topic tries with MQTT's matching
//! rules, shared-subscription groups and per-client bookkeeping.
//!
//! Every walk over a trie is a loop with an explicit stack, never a
//! recursion: a filter's depth comes from the network, and a recursion as
//! deep as a client's filter overflows a runtime worker's stack (a
//! 5,000-level filter did, before the broker's limits and these loops).

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};

use super::codec::Message;

/// A topic filter's levels, checked: `+` and `#` fill a whole level and `#`
/// is last.
pub(super) fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.len() > 65_535 || filter.contains('\0') {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(l) = levels.next() {
        let ok = match l {
            "#" => levels.peek().is_none(),
            "+" => true,
            l => !l.contains(['+', '#']),
        };
        if !ok {
            return false;
        }
    }
    true
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

#[cfg(test)]
use fleet_core::topic::filter_matches as matches;

#[derive(Default)]
struct Group {
    members: Vec<(String, u8)>,
    next: Cell<usize>,
}

#[derive(Default)]
struct Node {
    /// Boxed: a map's slot is a pointer, not a whole node (most maps
    /// hold one child, and a map has room for several).
    children: HashMap<Box<str>, Box<Node>>,
    /// Client id -> granted QoS.
    subscribers: HashMap<String, u8>,
    shared: BTreeMap<String, Group>,
}

/// Dropped level by level with a stack: the derived drop would recurse as
/// deep as the trie.
impl Drop for Node {
    fn drop(&mut self) {
        let mut stack: Vec<Box<Node>> = self.children.drain().map(|(_, n)| n).collect();
        while let Some(mut n) = stack.pop() {
            stack.extend(n.children.drain().map(|(_, c)| c));
        }
    }
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.subscribers.is_empty() && self.shared.is_empty()
    }

    fn holds_only_one_child(&self) -> bool {
        self.children.len() == 1 && self.subscribers.is_empty() && self.shared.is_empty()
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
            node = node.children.entry(Box::from(level)).or_default();
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

    /// The QoS `client` holds `filter` with (in shared `group`), if it does.
    pub(super) fn qos_of(&self, client: &str, group: Option<&str>, filter: &str) -> Option<u8> {
        let mut node = &self.root;
        for level in filter.split('/') {
            node = node.children.get(level)?;
        }
        match group {
            None => node.subscribers.get(client).copied(),
            Some(g) => node
                .shared
                .get(g)?
                .members
                .iter()
                .find(|(c, _)| c == client)
                .map(|(_, q)| *q),
        }
    }

    /// Removes a subscription; whether it existed. The chain of nodes it
    /// leaves empty is pruned in one cut, so the work is linear in the
    /// filter's depth.
    pub(super) fn remove(&mut self, client: &str, group: Option<&str>, filter: &str) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        // Below the deepest node on the path that holds anything besides
        // the path itself, everything is only this subscription's chain.
        let mut cut = 0;
        {
            let mut node = &self.root;
            for (depth, level) in levels.iter().enumerate() {
                if depth > 0 && !node.holds_only_one_child() {
                    cut = depth;
                }
                match node.children.get(*level) {
                    Some(child) => node = child,
                    None => return false,
                }
            }
        }
        let mut node = &mut self.root;
        for level in &levels {
            match node.children.get_mut(*level) {
                Some(child) => node = child,
                None => return false,
            }
        }
        let removed = match group {
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
        };
        if node.is_empty() {
            let mut parent = &mut self.root;
            for level in &levels[..cut] {
                match parent.children.get_mut(*level) {
                    Some(child) => parent = child,
                    None => return removed,
                }
            }
            parent.children.remove(levels[cut]);
        }
        removed
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
        collect(&self.root, &levels, topic.starts_with('$'), &mut nodes);
        nodes
    }

    /// The clients a message on `topic` goes to, each with the highest QoS
    /// it subscribed with; one member of each matching shared group, in
    /// turn, the next one that is `online` (a member away with a kept
    /// session only when no member is online).
    pub(super) fn recipients(
        &self,
        topic: &str,
        online: impl Fn(&str) -> bool,
    ) -> HashMap<&str, u8> {
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
                let n = group.members.len();
                let start = group.next.get() % n;
                let i = (0..n)
                    .map(|k| (start + k) % n)
                    .find(|&i| online(&group.members[i].0))
                    .unwrap_or(start);
                group.next.set(i + 1);
                let (client, qos) = &group.members[i];
                let e = out.entry(client.as_str()).or_insert(*qos);
                *e = (*e).max(*qos);
            }
        }
        out
    }
}

/// The nodes whose subscribers a message on `levels` reaches (a loop over
/// an explicit stack of (node, depth)).
fn collect<'a>(root: &'a Node, levels: &[&str], dollar: bool, out: &mut Vec<&'a Node>) {
    let mut stack: Vec<(&'a Node, usize)> = vec![(root, 0)];
    while let Some((node, depth)) = stack.pop() {
        match levels.get(depth) {
            None => {
                out.push(node);
                if let Some(h) = node.children.get("#") {
                    out.push(h);
                }
            }
            Some(level) => {
                if let Some(c) = node.children.get(*level) {
                    stack.push((c, depth + 1));
                }
                // A topic starting with `$` is not matched by a wildcard
                // in the first level.
                if depth == 0 && dollar {
                    continue;
                }
                if let Some(c) = node.children.get("+") {
                    stack.push((c, depth + 1));
                }
                if let Some(h) = node.children.get("#") {
                    out.push(h);
                }
            }
        }
    }
}

/// Retained messages by topic, in a trie so that a subscription visits
/// only the topics its filter can match, not every retained message.
#[derive(Default)]
pub(super) struct Retained {
    root: RetainedNode,
    count: usize,
    bytes: usize,
}

#[derive(Default)]
struct RetainedNode {
    children: HashMap<Box<str>, Box<RetainedNode>>,
    /// The message and the identity that retained it.
    message: Option<(Message, Box<str>)>,
}

impl Drop for RetainedNode {
    fn drop(&mut self) {
        let mut stack: Vec<Box<RetainedNode>> = self.children.drain().map(|(_, n)| n).collect();
        while let Some(mut n) = stack.pop() {
            stack.extend(n.children.drain().map(|(_, c)| c));
        }
    }
}

impl RetainedNode {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.message.is_none()
    }

    fn message(&self) -> Option<&Message> {
        self.message.as_ref().map(|(m, _)| m)
    }
}

/// The size a retained message is counted at.
pub(super) fn retained_size(m: &Message) -> usize {
    m.topic.len() + m.payload.len()
}

impl Retained {
    /// Messages kept.
    pub(super) fn len(&self) -> usize {
        self.count
    }

    /// Their topics' and payloads' bytes.
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// The identity that retained the message on `topic`.
    pub(super) fn owner(&self, topic: &str) -> Option<&str> {
        let mut node = &self.root;
        for level in topic.split('/') {
            node = node.children.get(level)?;
        }
        node.message.as_ref().map(|(_, o)| &**o)
    }

    /// Keeps `m` on its topic for `owner`; returns what it replaced.
    pub(super) fn insert(&mut self, m: Message, owner: &str) -> Option<(Message, Box<str>)> {
        let mut node = &mut self.root;
        for level in m.topic.split('/') {
            node = node.children.entry(Box::from(level)).or_default();
        }
        self.count += 1;
        self.bytes += retained_size(&m);
        let old = node.message.replace((m, owner.into()));
        if let Some((o, _)) = &old {
            self.count -= 1;
            self.bytes -= retained_size(o);
        }
        old
    }

    /// Drops the message on `topic`; returns it and its owner.
    pub(super) fn remove(&mut self, topic: &str) -> Option<(Message, Box<str>)> {
        let levels: Vec<&str> = topic.split('/').collect();
        let mut cut = 0;
        {
            let mut node = &self.root;
            for (depth, level) in levels.iter().enumerate() {
                if depth > 0 && (node.children.len() > 1 || node.message.is_some()) {
                    cut = depth;
                }
                node = node.children.get(*level)?;
            }
        }
        let mut node = &mut self.root;
        for level in &levels {
            node = node.children.get_mut(*level)?;
        }
        let old = node.message.take()?;
        if node.is_empty() {
            let mut parent = &mut self.root;
            for level in &levels[..cut] {
                parent = parent.children.get_mut(*level)?;
            }
            parent.children.remove(levels[cut]);
        }
        self.count -= 1;
        self.bytes -= retained_size(&old.0);
        Some(old)
    }

    /// The messages a subscription to `filter` receives, at most `limit`.
    pub(super) fn matching(&self, filter: &str, limit: usize) -> Vec<&Message> {
        let levels: Vec<&str> = filter.split('/').collect();
        let mut out: Vec<&Message> = Vec::new();
        let mut stack: Vec<(&RetainedNode, usize)> = vec![(&self.root, 0)];
        while let Some((node, depth)) = stack.pop() {
            if out.len() >= limit {
                break;
            }
            match levels.get(depth) {
                None => out.extend(node.message()),
                Some(&"#") => {
                    // The parent level itself, then every descendant
                    // (not `$` topics from the first level).
                    if depth > 0 {
                        out.extend(node.message());
                    }
                    let mut all: Vec<&RetainedNode> = node
                        .children
                        .iter()
                        .filter(|(name, _)| depth > 0 || !name.starts_with('$'))
                        .map(|(_, c)| &**c)
                        .collect();
                    while let Some(n) = all.pop() {
                        if out.len() >= limit {
                            break;
                        }
                        out.extend(n.message());
                        all.extend(n.children.values().map(|c| &**c));
                    }
                }
                Some(&"+") => {
                    for (name, child) in &node.children {
                        if depth == 0 && name.starts_with('$') {
                            continue;
                        }
                        stack.push((child, depth + 1));
                    }
                }
                Some(level) => {
                    if let Some(c) = node.children.get(*level) {
                        stack.push((c, depth + 1));
                    }
                }
            }
        }
        out.truncate(limit);
        out
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
            let got = subs.recipients(t, |_| true);
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
        let a = subs.recipients(t, |_| true);
        let b = subs.recipients(t, |_| true);
        assert_eq!(a.len(), 2);
        assert!(a.contains_key("mon") && b.contains_key("mon"));
        assert_ne!(a.contains_key("s1"), b.contains_key("s1"));
        // A member that is away is passed over while another is online.
        for _ in 0..4 {
            let r = subs.recipients(t, |c| c != "s1");
            assert!(r.contains_key("s2") && !r.contains_key("s1"));
        }
        // With nobody online, a member away still takes its turn.
        assert_eq!(
            subs.recipients(t, |c| c == "mon")
                .keys()
                .filter(|c| c.starts_with('s'))
                .count(),
            1
        );
        assert!(subs.remove("s1", Some("g"), "$aws/things/+/shadow/update"));
        assert!(subs.recipients(t, |_| true).contains_key("s2"));
    }

    #[test]
    fn a_very_deep_filter_is_added_matched_and_removed_without_recursion() {
        // 200,000 levels: a recursive walk overflows a 2 MiB stack long
        // before this (5,000 levels did in the runtime's workers).
        let deep = vec!["a"; 200_000].join("/");
        let mut subs = Subscriptions::default();
        subs.insert("c", None, &deep, 1);
        assert!(subs.recipients(&deep, |_| true).contains_key("c"));
        assert!(subs.remove("c", None, &deep));
        assert!(subs.root.is_empty());
        let mut retained = Retained::default();
        let m = |t: &str| Message {
            topic: t.into(),
            payload: bytes::Bytes::from_static(b"x"),
            qos: 0,
            retain: true,
            properties: None,
            receipt: None,
        };
        retained.insert(m(&deep), "c");
        assert_eq!(retained.matching("a/#", 10).len(), 1);
        assert!(retained.remove(&deep).is_some());
        assert!(retained.root.is_empty());
        assert_eq!((retained.len(), retained.bytes()), (0, 0));
    }

    #[test]
    fn retained_lookups_agree_with_the_matcher() {
        let topics = ["a/b", "a", "a/b/c", "$aws/t/x", "b/b", "x", "$aws"];
        let filters = [
            "a/b", "a/+", "a/#", "#", "+/b", "$aws/#", "$aws/+/x", "+", "a/b/#", "+/+/+",
        ];
        let mut retained = Retained::default();
        for t in topics {
            let m = Message {
                topic: t.into(),
                payload: bytes::Bytes::from_static(b"v"),
                qos: 1,
                retain: true,
                properties: None,
                receipt: None,
            };
            retained.insert(m, "owner");
        }
        assert_eq!(retained.len(), topics.len());
        for f in filters {
            let mut got: Vec<&str> = retained
                .matching(f, usize::MAX)
                .iter()
                .map(|m| m.topic.as_str())
                .collect();
            got.sort_unstable();
            let mut want: Vec<&str> = topics.iter().copied().filter(|t| matches(f, t)).collect();
            want.sort_unstable();
            assert_eq!(got, want, "{f}");
        }
        assert_eq!(retained.matching("#", 2).len(), 2);
        assert_eq!(retained.owner("a/b"), Some("owner"));
        assert!(retained.remove("a/b").is_some());
        assert_eq!(retained.owner("a/b"), None);
        assert_eq!(retained.owner("a/b/c"), Some("owner"));
        assert_eq!(retained.len(), topics.len() - 1);
    }
}
