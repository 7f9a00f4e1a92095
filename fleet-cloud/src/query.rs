//! The fleet query language: AWS IoT fleet indexing's query syntax
//! (Lucene's), over the fields the fleet index keeps of each thing.
//!
//! ```
//! use fleet_cloud::query::Query;
//! let q = Query::parse("thingName:pump-* AND shadow.reported.temp > 80 AND connectivity.connected:false")?;
//! assert_eq!(q.to_string(), "(thingName:pump-* AND shadow.reported.temp:{80 TO *] AND connectivity.connected:false)");
//! let e = Query::parse("thingName:pump-* AND (attributes.site:north").unwrap_err();
//! assert_eq!(e.position, 43); // the end: a `)` is missing
//! # Ok::<(), fleet_cloud::query::QueryError>(())
//! ```
//!
//! | form | matches |
//! |---|---|
//! | `field:value` | the value (text; a number also matches numerically: `attributes.size:5` matches `5` and `5.0`) |
//! | `field:"a phrase"` | the text exactly (`\` escapes) |
//! | `field:pre*`, `field:a?c*d` | a prefix; `*` any characters, `?` one |
//! | `field:*` | things that have the field |
//! | `field:[10 TO 20]`, `{10 TO 20}`, `[10 TO *]` | a range, `[`/`]` inclusive, `{`/`}` exclusive, `*` open; numeric when the bounds are numbers, text (byte order) when quoted or not numbers |
//! | `field > 80`, `>=`, `<`, `<=` (also `field:>80`) | a numeric comparison |
//! | `a AND b`, `a b`, `a OR b`, `NOT a`, `-a`, `( ... )` | Boolean logic; NOT binds tightest, then AND, then OR |
//! | `*` | every thing |
//!
//! The fields: `thingName`, `thingGroupNames` (static groups), `enabled`,
//! `attributes.{name}`, `shadow.reported.{path}`, `shadow.desired.{path}`
//! (the classic shadow), `shadow.name.{shadow}.reported.{path}` and
//! `.desired.{path}` (named shadows), `shadow.version` and
//! `shadow.name.{shadow}.version`, `connectivity.connected`,
//! `connectivity.timestamp` (milliseconds of the last connect or
//! disconnect), `connectivity.disconnectReason` (AWS's reasons:
//! `CLIENT_INITIATED_DISCONNECT`, `MQTT_KEEP_ALIVE_TIMEOUT`,
//! `DUPLICATE_CLIENTID`, ...), `connectivity.lastSeen` (milliseconds),
//! `jobs.{jobId}` (the thing's execution status: `QUEUED`,
//! `IN_PROGRESS`, `SUCCEEDED`, ...), and `inventory.{path}` (what the
//! device agent reports it runs: `inventory.components.firmware`,
//! `inventory.hardwareId`, `inventory.agent.version`,
//! `inventory.agent.protocol`). A path is the JSON keys joined by `.`;
//! an array's elements are each a value of the field.
//!
//! Unlike AWS, values match case-sensitively, and a term needs a field (no
//! free-text search).

use std::fmt;

use winnow::combinator::{alt, cut_err, delimited, preceded, repeat};
use winnow::error::{
    ContextError, ErrMode, FromExternalError, ModalResult, StrContext, StrContextValue,
};
use winnow::prelude::*;
use winnow::token::{any, one_of, take_while};

/// The longest query accepted, in bytes.
pub const MAX_QUERY_LEN: usize = 4096;
/// The most terms (field conditions) a query may have.
pub const MAX_TERMS: usize = 64;

/// A query, parsed and checked.
#[derive(Debug, Clone, PartialEq)]
pub enum Query {
    /// Every thing (`*`).
    All,
    /// A field condition.
    Term(Term),
    /// Every part matches.
    And(Vec<Query>),
    /// At least one part matches.
    Or(Vec<Query>),
    /// The part does not match.
    Not(Box<Query>),
}

/// One field condition: the thing has a value of `field` that `test`
/// accepts.
#[derive(Debug, Clone, PartialEq)]
pub struct Term {
    /// The field, as indexed (`shadow.reported.temp`).
    pub field: String,
    /// What its value must be.
    pub test: Test,
}

/// A bound of a range: the value and whether it is included.
#[derive(Debug, Clone, PartialEq)]
pub struct Bound<T> {
    /// The bound.
    pub value: T,
    /// Whether the bound itself is in the range.
    pub inclusive: bool,
}

/// What a value must be.
#[derive(Debug, Clone, PartialEq)]
pub enum Test {
    /// Equal to the text, or (when the text is a number) numerically equal.
    Equals(String),
    /// Text starting with the prefix.
    Prefix(String),
    /// Text matching a pattern of `*` (any characters) and `?` (one).
    Pattern(Vec<Glob>),
    /// Any value.
    Exists,
    /// A number within the bounds (`None`: open).
    Number(Option<Bound<f64>>, Option<Bound<f64>>),
    /// Text within the bounds, in byte order.
    Text(Option<Bound<String>>, Option<Bound<String>>),
}

/// A piece of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Glob {
    /// This text.
    Literal(String),
    /// Any characters (`*`).
    Any,
    /// One character (`?`).
    One,
}

/// A query that cannot be parsed or names no field of the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryError {
    /// Where (bytes from the start of the query).
    pub position: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for QueryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at position {}: {}", self.position, self.message)
    }
}

impl std::error::Error for QueryError {}

/// The value of a field as the index keeps it.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue {
    /// Text.
    Text(String),
    /// A number.
    Number(f64),
    /// `true` or `false`.
    Bool(bool),
}

impl FieldValue {
    /// The text the index keeps (a number as JSON writes it).
    pub fn text(&self) -> String {
        match self {
            Self::Text(s) => s.clone(),
            Self::Number(n) => number_text(*n),
            Self::Bool(b) => b.to_string(),
        }
    }

    /// The number the index keeps: a number, or text that is one.
    pub fn number(&self) -> Option<f64> {
        match self {
            Self::Text(s) => parse_number(s),
            Self::Number(n) => Some(*n),
            Self::Bool(_) => None,
        }
    }
}

/// A number written as JSON writes it (`80`, `80.5`).
pub fn number_text(n: f64) -> String {
    // Integral values as integers, as devices send them.
    if n.fract() == 0.0 && n.abs() < 9.0e15 {
        format!("{}", n as i64)
    } else {
        serde_json::Number::from_f64(n)
            .map(|n| n.to_string())
            .unwrap_or_default()
    }
}

/// Text that is a finite number.
pub fn parse_number(s: &str) -> Option<f64> {
    let first = s.as_bytes().first()?;
    if !(first.is_ascii_digit() || *first == b'-' || *first == b'+' || *first == b'.') {
        return None;
    }
    s.parse::<f64>().ok().filter(|n| n.is_finite())
}

/// One value of one field of a thing, as the index keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The field (`attributes.site`).
    pub field: String,
    /// Its value.
    pub value: FieldValue,
}

impl Entry {
    /// `field` = `value`.
    pub fn new(field: impl Into<String>, value: FieldValue) -> Self {
        Self {
            field: field.into(),
            value,
        }
    }
}

impl Test {
    /// The test with its text folded to ASCII lower case: values are
    /// compared without regard to case, as AWS IoT's fleet indexing
    /// searches (field names keep theirs). The index keeps each value's
    /// text folded the same way.
    pub fn folded(self) -> Self {
        let fold = |s: String| s.to_ascii_lowercase();
        let bound = |b: Option<Bound<String>>| {
            b.map(|b| Bound {
                value: fold(b.value),
                inclusive: b.inclusive,
            })
        };
        match self {
            Self::Equals(v) => Self::Equals(fold(v)),
            Self::Prefix(p) => Self::Prefix(fold(p)),
            Self::Pattern(p) => Self::Pattern(
                p.into_iter()
                    .map(|g| match g {
                        Glob::Literal(l) => Glob::Literal(fold(l)),
                        other => other,
                    })
                    .collect(),
            ),
            Self::Text(lo, hi) => Self::Text(bound(lo), bound(hi)),
            other @ (Self::Exists | Self::Number(..)) => other,
        }
    }

    /// Whether a value with this text (folded, as [`folded`](Self::folded)
    /// folds) and number passes.
    pub fn accepts(&self, text: &str, number: Option<f64>) -> bool {
        match self {
            Self::Equals(v) => text == v || parse_number(v).is_some_and(|n| number == Some(n)),
            Self::Prefix(p) => text.starts_with(p.as_str()),
            Self::Pattern(p) => glob_matches(p, text),
            Self::Exists => true,
            Self::Number(lo, hi) => number.is_some_and(|n| within(&n, lo, hi)),
            Self::Text(lo, hi) => within(
                &text,
                &lo.as_ref().map(|b| Bound {
                    value: b.value.as_str(),
                    inclusive: b.inclusive,
                }),
                &hi.as_ref().map(|b| Bound {
                    value: b.value.as_str(),
                    inclusive: b.inclusive,
                }),
            ),
        }
    }
}

fn within<T: PartialOrd>(v: &T, lo: &Option<Bound<T>>, hi: &Option<Bound<T>>) -> bool {
    let above = match lo {
        None => true,
        Some(b) if b.inclusive => *v >= b.value,
        Some(b) => *v > b.value,
    };
    let below = match hi {
        None => true,
        Some(b) if b.inclusive => *v <= b.value,
        Some(b) => *v < b.value,
    };
    above && below
}

fn glob_matches(pattern: &[Glob], text: &str) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((Glob::Literal(l), rest)) => {
            text.starts_with(l.as_str()) && glob_matches(rest, &text[l.len()..])
        }
        Some((Glob::One, rest)) => {
            let mut chars = text.chars();
            chars.next().is_some() && glob_matches(rest, chars.as_str())
        }
        Some((Glob::Any, rest)) => {
            if rest.is_empty() {
                return true;
            }
            text.char_indices()
                .map(|(i, _)| i)
                .chain(std::iter::once(text.len()))
                .any(|i| glob_matches(rest, &text[i..]))
        }
    }
}

impl Query {
    /// Parses `text`; an error says where and what is wrong.
    pub fn parse(text: &str) -> Result<Self, QueryError> {
        if text.len() > MAX_QUERY_LEN {
            return Err(QueryError {
                position: MAX_QUERY_LEN,
                message: format!("a query is at most {MAX_QUERY_LEN} bytes"),
            });
        }
        if text.trim().is_empty() {
            return Err(QueryError {
                position: 0,
                message: "the query is empty (`*` matches every thing)".into(),
            });
        }
        let mut input = text;
        let parsed = delimited(ws, or_expr, ws).parse_next(&mut input);
        let at = |rest: &str| text.len() - rest.len();
        let query = match parsed {
            Ok(q) if input.is_empty() => q,
            Ok(_) => {
                return Err(QueryError {
                    position: at(input),
                    message: if input.starts_with(')') {
                        "a `)` without its `(`".into()
                    } else {
                        "expected AND, OR, NOT, a term or the end of the query".into()
                    },
                });
            }
            Err(e) => {
                let e = match e {
                    ErrMode::Backtrack(e) | ErrMode::Cut(e) => e,
                    ErrMode::Incomplete(_) => ContextError::new(),
                };
                let message = e.to_string().replace('\n', "; ");
                return Err(QueryError {
                    position: at(input),
                    message: if message.is_empty() {
                        "expected a term (`field:value`)".into()
                    } else {
                        message
                    },
                });
            }
        };
        let terms = query.terms();
        if terms > MAX_TERMS {
            return Err(QueryError {
                position: 0,
                message: format!("a query has at most {MAX_TERMS} terms ({terms} here)"),
            });
        }
        Ok(query)
    }

    fn terms(&self) -> usize {
        match self {
            Self::All => 0,
            Self::Term(_) => 1,
            Self::And(v) | Self::Or(v) => v.iter().map(Self::terms).sum(),
            Self::Not(q) => q.terms(),
        }
    }

    /// Whether a thing with these entries matches (a thing that has no
    /// `thingName` entry is not registered and matches nothing).
    pub fn matches(&self, entries: &[Entry]) -> bool {
        let refs: Vec<&Entry> = entries.iter().collect();
        self.matches_refs(&refs)
    }

    /// [`matches`](Self::matches), over borrowed entries.
    pub fn matches_refs(&self, entries: &[&Entry]) -> bool {
        entries.iter().any(|e| e.field == "thingName") && self.eval(entries)
    }

    fn eval(&self, entries: &[&Entry]) -> bool {
        match self {
            Self::All => true,
            Self::Term(t) => entries.iter().any(|e| {
                e.field == t.field
                    && t.test
                        .accepts(&e.value.text().to_ascii_lowercase(), e.value.number())
            }),
            Self::And(v) => v.iter().all(|q| q.eval(entries)),
            Self::Or(v) => v.iter().any(|q| q.eval(entries)),
            Self::Not(q) => !q.eval(entries),
        }
    }

    /// Every field the query reads.
    pub fn fields(&self) -> Vec<&str> {
        let mut out = Vec::new();
        self.collect_fields(&mut out);
        out
    }

    fn collect_fields<'a>(&'a self, out: &mut Vec<&'a str>) {
        match self {
            Self::All => {}
            Self::Term(t) => out.push(&t.field),
            Self::And(v) | Self::Or(v) => v.iter().for_each(|q| q.collect_fields(out)),
            Self::Not(q) => q.collect_fields(out),
        }
    }
}

/// Whether `field` is a field the index can hold.
pub fn check_field(field: &str) -> Result<(), String> {
    const FIXED: &[&str] = &[
        "thingName",
        "thingGroupNames",
        "enabled",
        "shadow.version",
        "connectivity.connected",
        "connectivity.timestamp",
        "connectivity.disconnectReason",
        "connectivity.lastSeen",
    ];
    if FIXED.contains(&field) {
        return Ok(());
    }
    let nonempty = |rest: &str| !rest.is_empty() && !rest.split('.').any(str::is_empty);
    if let Some(rest) = field.strip_prefix("attributes.") {
        if !rest.is_empty() {
            return Ok(());
        }
    } else if let Some(rest) = field.strip_prefix("inventory.") {
        if nonempty(rest) {
            return Ok(());
        }
    } else if let Some(rest) = field.strip_prefix("jobs.") {
        if !rest.is_empty() && !rest.contains('.') {
            return Ok(());
        }
    } else if let Some(rest) = field.strip_prefix("shadow.") {
        let rest = match rest.strip_prefix("name.") {
            Some(named) => match named.split_once('.') {
                Some((name, rest)) if !name.is_empty() => {
                    if rest == "version" {
                        return Ok(());
                    }
                    rest
                }
                _ => {
                    return Err(format!(
                        "`{field}`: expected shadow.name.{{shadow}}.reported.{{path}}"
                    ));
                }
            },
            None => rest,
        };
        for section in ["reported.", "desired."] {
            if rest.strip_prefix(section).is_some_and(nonempty) {
                return Ok(());
            }
        }
        return Err(format!(
            "`{field}`: a shadow field is shadow[.name.{{shadow}}].reported.{{path}}, .desired.{{path}} or .version"
        ));
    }
    Err(format!(
        "unknown field `{field}` (fields: thingName, thingGroupNames, enabled, attributes.*, shadow.*, connectivity.*, inventory.*, jobs.*)"
    ))
}

// ---- the parser ----

fn ws(i: &mut &str) -> ModalResult<()> {
    take_while(0.., char::is_whitespace).void().parse_next(i)
}

fn expected(what: &'static str) -> StrContext {
    StrContext::Expected(StrContextValue::Description(what))
}

/// `k` as a whole word.
fn keyword(k: &'static str) -> impl FnMut(&mut &str) -> ModalResult<()> {
    move |i: &mut &str| {
        let rest = i
            .strip_prefix(k)
            .ok_or_else(|| ErrMode::Backtrack(ContextError::new()))?;
        match rest.chars().next() {
            None => {
                *i = rest;
                Ok(())
            }
            Some(c) if c.is_whitespace() || c == '(' || c == '-' => {
                *i = rest;
                Ok(())
            }
            _ => Err(ErrMode::Backtrack(ContextError::new())),
        }
    }
}

fn or_expr(i: &mut &str) -> ModalResult<Query> {
    let first = and_expr(i)?;
    let rest: Vec<Query> = repeat(
        0..,
        preceded(
            (ws, keyword("OR"), ws),
            cut_err(and_expr).context(expected("a term after OR")),
        ),
    )
    .parse_next(i)?;
    Ok(combine(first, rest, Query::Or))
}

fn and_expr(i: &mut &str) -> ModalResult<Query> {
    let first = unary(i)?;
    let rest: Vec<Query> = repeat(
        0..,
        alt((
            preceded(
                (ws, keyword("AND"), ws),
                cut_err(unary).context(expected("a term after AND")),
            ),
            // Juxtaposed terms: AND (Lucene's default operator).
            preceded(ws, unary),
        )),
    )
    .parse_next(i)?;
    Ok(combine(first, rest, Query::And))
}

fn combine(first: Query, rest: Vec<Query>, f: fn(Vec<Query>) -> Query) -> Query {
    if rest.is_empty() {
        first
    } else {
        let mut all = vec![first];
        all.extend(rest);
        f(all)
    }
}

fn unary(i: &mut &str) -> ModalResult<Query> {
    alt((
        preceded(
            (keyword("NOT"), ws),
            cut_err(unary).context(expected("a term after NOT")),
        )
        .map(|q| Query::Not(Box::new(q))),
        preceded('-', cut_err(unary).context(expected("a term after `-`")))
            .map(|q| Query::Not(Box::new(q))),
        primary,
    ))
    .parse_next(i)
}

fn primary(i: &mut &str) -> ModalResult<Query> {
    alt((
        delimited(
            ('(', ws),
            cut_err(or_expr).context(expected("a term after `(`")),
            cut_err((ws, ')')).context(expected("`)`")),
        ),
        all,
        term,
    ))
    .parse_next(i)
}

/// `*` alone: every thing.
fn all(i: &mut &str) -> ModalResult<Query> {
    let rest = i
        .strip_prefix('*')
        .ok_or_else(|| ErrMode::Backtrack(ContextError::new()))?;
    match rest.chars().next() {
        None | Some(')') => {}
        Some(c) if c.is_whitespace() => {}
        _ => return Err(ErrMode::Backtrack(ContextError::new())),
    }
    *i = rest;
    Ok(Query::All)
}

fn is_field_char(c: char) -> bool {
    !(c.is_whitespace() || "():[]{}\"<>=\\*?".contains(c))
}

fn term(i: &mut &str) -> ModalResult<Query> {
    let start = *i;
    let field: String = repeat(
        1..,
        alt((preceded('\\', any), one_of(|c: char| is_field_char(c)))),
    )
    .fold(String::new, |mut s, c| {
        s.push(c);
        s
    })
    .parse_next(i)?;
    if matches!(field.as_str(), "AND" | "OR" | "NOT") || field.starts_with('-') {
        *i = start;
        return Err(ErrMode::Backtrack(ContextError::new()));
    }
    if let Err(message) = check_field(&field) {
        *i = start;
        return Err(ErrMode::Cut(ContextError::from_external_error(
            i,
            FieldError(message),
        )));
    }
    ws(i)?;
    let test = cut_err(alt((
        comparison,
        preceded(
            (':', ws),
            cut_err(value).context(expected("a value after `:`")),
        ),
    )))
    .context(expected(
        "`:` or a comparison (`>`, `>=`, `<`, `<=`) after the field name",
    ))
    .parse_next(i)?;
    Ok(Query::Term(Term {
        field,
        test: test.folded(),
    }))
}

/// A field the index cannot hold (the cause of a parse error).
#[derive(Debug)]
struct FieldError(String);

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FieldError {}

fn comparison(i: &mut &str) -> ModalResult<Test> {
    let op = alt((">=", "<=", ">", "<")).parse_next(i)?;
    ws(i)?;
    let n = cut_err(number)
        .context(expected("a number"))
        .parse_next(i)?;
    Ok(compare(op, n))
}

fn compare(op: &str, n: f64) -> Test {
    let b = |inclusive| {
        Some(Bound {
            value: n,
            inclusive,
        })
    };
    match op {
        ">=" => Test::Number(b(true), None),
        ">" => Test::Number(b(false), None),
        "<=" => Test::Number(None, b(true)),
        _ => Test::Number(None, b(false)),
    }
}

fn number(i: &mut &str) -> ModalResult<f64> {
    take_while(1.., |c: char| c.is_ascii_digit() || "+-.eE".contains(c))
        .verify_map(parse_number)
        .parse_next(i)
}

/// A piece of a value word: text or a wildcard.
fn word(i: &mut &str) -> ModalResult<Vec<Glob>> {
    let pieces: Vec<Glob> = repeat(
        1..,
        alt((
            preceded('\\', any).map(|c: char| Glob::Literal(c.to_string())),
            '*'.value(Glob::Any),
            '?'.value(Glob::One),
            one_of(|c: char| !(c.is_whitespace() || "()[]{}\":\\".contains(c)))
                .map(|c: char| Glob::Literal(c.to_string())),
        )),
    )
    .parse_next(i)?;
    // Join adjacent literals.
    let mut out: Vec<Glob> = Vec::new();
    for p in pieces {
        match (out.last_mut(), p) {
            (Some(Glob::Literal(a)), Glob::Literal(b)) => a.push_str(&b),
            (_, p) => out.push(p),
        }
    }
    Ok(out)
}

fn quoted(i: &mut &str) -> ModalResult<String> {
    preceded(
        '"',
        cut_err((
            repeat(
                0..,
                alt((preceded('\\', any), one_of(|c: char| c != '"' && c != '\\'))),
            )
            .fold(String::new, |mut s, c| {
                s.push(c);
                s
            }),
            '"',
        ))
        .context(expected("a closing `\"`")),
    )
    .map(|(s, _)| s)
    .parse_next(i)
}

fn value(i: &mut &str) -> ModalResult<Test> {
    alt((
        range,
        comparison,
        quoted.map(Test::Equals),
        word.map(|w| match w.as_slice() {
            [Glob::Any] => Test::Exists,
            [Glob::Literal(l)] => Test::Equals(l.clone()),
            [Glob::Literal(l), Glob::Any] => Test::Prefix(l.clone()),
            _ => Test::Pattern(w),
        }),
    ))
    .parse_next(i)
}

/// A range bound: `None` for `*`.
fn bound(i: &mut &str) -> ModalResult<(Option<String>, bool)> {
    alt((
        quoted.map(|s| (Some(s), true)),
        '*'.value((None, false)),
        take_while(1.., |c: char| !(c.is_whitespace() || "[]{}\"*".contains(c)))
            .map(|s: &str| (Some(s.to_string()), false)),
    ))
    .parse_next(i)
}

fn range(i: &mut &str) -> ModalResult<Test> {
    let open = one_of(['[', '{']).parse_next(i)?;
    let (lo, _, _, _, hi, _, close) = cut_err((
        preceded(ws, bound).context(expected("a lower bound or `*`")),
        ws,
        "TO",
        ws,
        bound.context(expected("an upper bound or `*`")),
        ws,
        one_of([']', '}']).context(expected("`]` or `}`")),
    ))
    .parse_next(i)?;
    let (lo_incl, hi_incl) = (open == '[', close == ']');
    let numeric = |b: &(Option<String>, bool)| match b {
        (None, _) => true,
        (Some(s), quoted) => !quoted && parse_number(s).is_some(),
    };
    if numeric(&lo) && numeric(&hi) && (lo.0.is_some() || hi.0.is_some()) {
        let num = |s: Option<String>, inclusive| {
            s.and_then(|s| parse_number(&s))
                .map(|value| Bound { value, inclusive })
        };
        Ok(Test::Number(num(lo.0, lo_incl), num(hi.0, hi_incl)))
    } else {
        let text = |s: Option<String>, inclusive| s.map(|value| Bound { value, inclusive });
        Ok(Test::Text(text(lo.0, lo_incl), text(hi.0, hi_incl)))
    }
}

// ---- display: the canonical form, which parses back to the same query ----

impl fmt::Display for Query {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |f: &mut fmt::Formatter<'_>, v: &[Query], op: &str| {
            f.write_str("(")?;
            for (n, q) in v.iter().enumerate() {
                if n > 0 {
                    write!(f, " {op} ")?;
                }
                write!(f, "{q}")?;
            }
            f.write_str(")")
        };
        match self {
            Self::All => f.write_str("*"),
            Self::Term(t) => write!(f, "{}:{}", escape(&t.field, false), t.test),
            Self::And(v) => list(f, v, "AND"),
            Self::Or(v) => list(f, v, "OR"),
            Self::Not(q) => write!(f, "NOT {q}"),
        }
    }
}

fn escape(s: &str, value: bool) -> String {
    let mut out = String::new();
    for c in s.chars() {
        let special = if value {
            c.is_whitespace() || "()[]{}\":\\*?<>=".contains(c)
        } else {
            !is_field_char(c)
        };
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

impl fmt::Display for Test {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = |lo: bool, b: Option<(String, bool)>| match b {
            None => (if lo { "[*" } else { "*]" }).to_string(),
            Some((v, incl)) => {
                if lo {
                    format!("{}{v}", if incl { "[" } else { "{" })
                } else {
                    format!("{v}{}", if incl { "]" } else { "}" })
                }
            }
        };
        match self {
            Self::Equals(v) if v.is_empty() || v.starts_with(['>', '<', '-']) => {
                f.write_str(&quote(v))
            }
            Self::Equals(v) => f.write_str(&escape(v, true)),
            Self::Prefix(p) => write!(f, "{}*", escape(p, true)),
            Self::Pattern(p) => {
                for g in p {
                    match g {
                        Glob::Literal(l) => f.write_str(&escape(l, true))?,
                        Glob::Any => f.write_str("*")?,
                        Glob::One => f.write_str("?")?,
                    }
                }
                Ok(())
            }
            Self::Exists => f.write_str("*"),
            Self::Number(lo, hi) => {
                let n = |x: &Option<Bound<f64>>| {
                    x.as_ref().map(|x| (number_text(x.value), x.inclusive))
                };
                write!(f, "{} TO {}", b(true, n(lo)), b(false, n(hi)))
            }
            Self::Text(lo, hi) => {
                let t =
                    |x: &Option<Bound<String>>| x.as_ref().map(|x| (quote(&x.value), x.inclusive));
                write!(f, "{} TO {}", b(true, t(lo)), b(false, t(hi)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Query {
        Query::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn term(field: &str, test: Test) -> Query {
        Query::Term(Term {
            field: field.into(),
            test,
        })
    }

    #[test]
    fn the_forms_of_the_table_parse() {
        assert_eq!(
            p("thingName:pump-1"),
            term("thingName", Test::Equals("pump-1".into()))
        );
        assert_eq!(
            p("thingName:pump-*"),
            term("thingName", Test::Prefix("pump-".into()))
        );
        assert_eq!(
            p("attributes.site:*"),
            term("attributes.site", Test::Exists)
        );
        assert_eq!(
            p("thingName:*ump?1"),
            term(
                "thingName",
                Test::Pattern(vec![
                    Glob::Any,
                    Glob::Literal("ump".into()),
                    Glob::One,
                    Glob::Literal("1".into())
                ])
            )
        );
        assert_eq!(
            p("shadow.reported.temp > 80"),
            term(
                "shadow.reported.temp",
                Test::Number(
                    Some(Bound {
                        value: 80.0,
                        inclusive: false
                    }),
                    None
                )
            )
        );
        assert_eq!(p("shadow.reported.temp:>80"), p("shadow.reported.temp>80"));
        assert_eq!(
            p("attributes.n:[75 TO 80}"),
            term(
                "attributes.n",
                Test::Number(
                    Some(Bound {
                        value: 75.0,
                        inclusive: true
                    }),
                    Some(Bound {
                        value: 80.0,
                        inclusive: false
                    })
                )
            )
        );
        assert_eq!(
            p(r#"attributes.s:["abcd" TO *]"#),
            term(
                "attributes.s",
                Test::Text(
                    Some(Bound {
                        value: "abcd".into(),
                        inclusive: true
                    }),
                    None
                )
            )
        );
        assert_eq!(
            p(r#"attributes.s:"a b\"c""#),
            term("attributes.s", Test::Equals("a b\"c".into()))
        );
        assert_eq!(p("*"), Query::All);
    }

    #[test]
    fn not_binds_tighter_than_and_which_binds_tighter_than_or() {
        let q = p("thingName:a OR thingName:b attributes.x:1 AND NOT enabled:false");
        assert_eq!(
            q.to_string(),
            "(thingName:a OR (thingName:b AND attributes.x:1 AND NOT enabled:false))"
        );
        assert_eq!(p("-thingName:a"), Query::Not(Box::new(p("thingName:a"))));
        assert_eq!(
            p("(thingName:a OR thingName:b) AND enabled:true").to_string(),
            "((thingName:a OR thingName:b) AND enabled:true)"
        );
    }

    #[test]
    fn the_canonical_form_parses_back_to_the_same_query() {
        for s in [
            "thingName:pump-* AND shadow.reported.temp > 80 AND connectivity.connected:false",
            r#"attributes.s:["a\"b" TO "z"} OR -attributes.t:"" OR attributes.u:"-x""#,
            "attributes.a\\:b:c\\*d OR attributes.q:a*b? OR shadow.name.cfg.desired.x.y:<=-2.5",
            "NOT (jobs.fw-2:SUCCEEDED OR jobs.fw-2:IN_PROGRESS) thingGroupNames:north",
        ] {
            let q = p(s);
            assert_eq!(p(&q.to_string()), q, "{s} -> {q}");
        }
    }

    #[test]
    fn malformed_queries_say_where() {
        for (q, at, says) in [
            ("thingName:a AND", 15, "after AND"),
            ("(thingName:a", 12, "`)`"),
            ("thingName:a)", 11, "`)`"),
            ("thingName", 9, "`:`"),
            ("color:red", 0, "known field"),
            ("shadow.reportd.x:1", 0, "shadow field"),
            ("attributes.n:[1 TO", 18, "upper bound"),
            ("attributes.n > x", 15, "number"),
            ("attributes.s:\"abc", 17, "closing"),
            ("", 0, "empty"),
        ] {
            let e = Query::parse(q).expect_err(q);
            assert_eq!(e.position, at, "{q}: {e}");
            assert!(e.message.contains(says), "{q}: {e}");
        }
        let long = format!("thingName:{}", "a".repeat(MAX_QUERY_LEN));
        assert!(Query::parse(&long).unwrap_err().message.contains("at most"));
        let many = vec!["thingName:a"; MAX_TERMS + 1].join(" OR ");
        assert!(Query::parse(&many).unwrap_err().message.contains("terms"));
    }

    #[test]
    fn tests_accept_what_the_table_says() {
        let e = |f: &str, v: FieldValue| Entry::new(f, v);
        let thing = vec![
            e("thingName", FieldValue::Text("pump-7".into())),
            e("attributes.size", FieldValue::Text("5.0".into())),
            e("shadow.reported.temp", FieldValue::Number(81.5)),
            e("shadow.reported.tags", FieldValue::Text("a".into())),
            e("shadow.reported.tags", FieldValue::Text("b".into())),
            e("connectivity.connected", FieldValue::Bool(false)),
        ];
        for (q, want) in [
            ("thingName:pump-*", true),
            ("thingName:pump-?", true),
            ("thingName:*7", true),
            ("thingName:pump", false),
            ("attributes.size:5", true),
            ("attributes.size:[5 TO 6]", true),
            ("attributes.size:{5 TO 6]", false),
            ("shadow.reported.temp > 80", true),
            ("shadow.reported.temp:81.5", true),
            ("shadow.reported.temp:[* TO 81.5}", false),
            ("shadow.reported.tags:b AND shadow.reported.tags:a", true),
            ("connectivity.connected:false", true),
            ("NOT connectivity.connected:true", true),
            ("attributes.missing:*", false),
            ("NOT attributes.missing:*", true),
            (r#"thingName:["pump-1" TO "pump-8"]"#, true),
            ("*", true),
        ] {
            assert_eq!(p(q).matches(&thing), want, "{q}");
        }
        assert!(!Query::All.matches(&thing[1..]), "not registered");
    }
}
