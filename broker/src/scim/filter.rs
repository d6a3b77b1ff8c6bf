//! SCIM filters (RFC 7644 §3.4.2.2) and PATCH paths (§3.5.2), parsed into trees and evaluated
//! on a resource's JSON. Pure: no I/O; malformed input is an error (`invalidFilter`,
//! `invalidPath`), never a panic, and nesting and length are bounded.
//!
//! Attribute names are compared without regard to case; string values too, unless the
//! attribute is case-exact (`id`, `externalId`, references). A multi-valued complex attribute
//! compared without a sub-attribute compares its `value`s (`emails eq "a@b.c"`). Besides the
//! RFC's grammar, `attr[filter].sub op value` (what Entra ID and others send, like
//! `emails[type eq "work"].value eq "a@b.c"`) is read as `attr[filter and sub op value]`.

use serde_json::Value;

use super::ScimError;

/// Longest filter or path taken.
pub const MAX_LEN: usize = 4096;
/// Deepest nesting of parentheses, brackets and `not` taken.
const MAX_DEPTH: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Co,
    Sw,
    Ew,
    Gt,
    Lt,
    Ge,
    Le,
}

impl Op {
    fn parse(word: &str) -> Option<Op> {
        Some(match word.to_ascii_lowercase().as_str() {
            "eq" => Op::Eq,
            "ne" => Op::Ne,
            "co" => Op::Co,
            "sw" => Op::Sw,
            "ew" => Op::Ew,
            "gt" => Op::Gt,
            "lt" => Op::Lt,
            "ge" => Op::Ge,
            "le" => Op::Le,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    Str(String),
    Num(f64),
    Bool(bool),
    Null,
}

/// An attribute and maybe one of its sub-attributes, lower case, schema URN left off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttrPath {
    pub attr: String,
    pub sub: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    Present(AttrPath),
    Compare(AttrPath, Op, Literal),
    /// `attr[filter]`: some value of `attr` matches `filter`, whose paths name sub-attributes.
    Any(String, Box<Filter>),
    Not(Box<Filter>),
    And(Box<Filter>, Box<Filter>),
    Or(Box<Filter>, Box<Filter>),
}

/// What an attribute holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A string; `exact`: compared with regard to case.
    Str {
        exact: bool,
    },
    Bool,
    DateTime,
    Complex(&'static [Attr]),
}

/// An attribute of a resource schema (name in lower case).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub name: &'static str,
    pub kind: Kind,
    pub multi: bool,
}

const fn attr(name: &'static str, kind: Kind, multi: bool) -> Attr {
    Attr { name, kind, multi }
}

const CI: Kind = Kind::Str { exact: false };
const EXACT: Kind = Kind::Str { exact: true };

const META: &[Attr] = &[
    attr("resourcetype", EXACT, false),
    attr("created", Kind::DateTime, false),
    attr("lastmodified", Kind::DateTime, false),
    attr("location", EXACT, false),
    attr("version", EXACT, false),
];

const REFERENCE: &[Attr] = &[
    attr("value", EXACT, false),
    attr("display", CI, false),
    attr("type", CI, false),
    attr("$ref", EXACT, false),
];

const EMAIL: &[Attr] = &[
    attr("value", CI, false),
    attr("display", CI, false),
    attr("type", CI, false),
    attr("primary", Kind::Bool, false),
];

const NAME: &[Attr] = &[
    attr("formatted", CI, false),
    attr("familyname", CI, false),
    attr("givenname", CI, false),
    attr("middlename", CI, false),
    attr("honorificprefix", CI, false),
    attr("honorificsuffix", CI, false),
];

/// The attributes a resource type can be filtered and patched on, with its schema URN.
#[derive(Debug, Clone, Copy)]
pub struct Schema {
    pub urn: &'static str,
    pub attrs: &'static [Attr],
}

pub const USER: Schema = Schema {
    urn: super::resource::USER_SCHEMA,
    attrs: &[
        attr("id", EXACT, false),
        attr("externalid", EXACT, false),
        attr("username", CI, false),
        attr("displayname", CI, false),
        attr("name", Kind::Complex(NAME), false),
        attr("emails", Kind::Complex(EMAIL), true),
        attr("active", Kind::Bool, false),
        attr("groups", Kind::Complex(REFERENCE), true),
        attr("meta", Kind::Complex(META), false),
    ],
};

pub const GROUP: Schema = Schema {
    urn: super::resource::GROUP_SCHEMA,
    attrs: &[
        attr("id", EXACT, false),
        attr("externalid", EXACT, false),
        attr("displayname", CI, false),
        attr("members", Kind::Complex(REFERENCE), true),
        attr("meta", Kind::Complex(META), false),
    ],
};

fn find(attrs: &'static [Attr], name: &str) -> Option<&'static Attr> {
    attrs.iter().find(|a| a.name == name)
}

fn invalid_filter(detail: impl Into<String>) -> ScimError {
    ScimError::bad("invalidFilter", detail)
}

// ---- Tokens

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    LParen,
    RParen,
    LBracket,
    RBracket,
    Word(String),
    Str(String),
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, ':' | '.' | '$' | '_' | '-' | '+')
}

fn tokenize(text: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some(&(i, c)) = chars.peek() {
        match c {
            ' ' | '\t' | '\r' | '\n' => {
                chars.next();
            }
            '(' => {
                chars.next();
                out.push(Tok::LParen);
            }
            ')' => {
                chars.next();
                out.push(Tok::RParen);
            }
            '[' => {
                chars.next();
                out.push(Tok::LBracket);
            }
            ']' => {
                chars.next();
                out.push(Tok::RBracket);
            }
            '"' => {
                // A JSON string: find its closing quote (skipping escapes), let serde read it.
                chars.next();
                let mut end = None;
                let mut escaped = false;
                for (j, d) in chars.by_ref() {
                    if escaped {
                        escaped = false;
                    } else if d == '\\' {
                        escaped = true;
                    } else if d == '"' {
                        end = Some(j);
                        break;
                    }
                }
                let end = end.ok_or("a string is not closed")?;
                let s: String = serde_json::from_str(&text[i..=end])
                    .map_err(|_| "a string has a bad escape".to_string())?;
                out.push(Tok::Str(s));
            }
            c if is_word_char(c) => {
                let mut end = text.len();
                while let Some(&(j, d)) = chars.peek() {
                    if is_word_char(d) {
                        chars.next();
                    } else {
                        end = j;
                        break;
                    }
                }
                out.push(Tok::Word(text[i..end].to_string()));
            }
            other => return Err(format!("unexpected character {other:?}")),
        }
    }
    Ok(out)
}

/// `[schema URN:]attr[.sub]` as written: (URN in lower case if any, attr, sub), names checked
/// (ALPHA *(ALPHA / DIGIT / "-" / "_"), or `$ref`) and put in lower case.
fn split_path(word: &str) -> Result<(Option<String>, String, Option<String>), String> {
    let (urn, rest) = if word.len() > 4 && word[..4].eq_ignore_ascii_case("urn:") {
        let at = word.rfind(':').unwrap_or(0);
        (Some(word[..at].to_ascii_lowercase()), &word[at + 1..])
    } else {
        (None, word)
    };
    let mut parts = rest.split('.');
    let attr = parts.next().unwrap_or("");
    let sub = parts.next();
    if parts.next().is_some() {
        return Err(format!("{word:?} is not an attribute path"));
    }
    let name_ok = |n: &str| {
        n == "$ref"
            || (n.starts_with(|c: char| c.is_ascii_alphabetic())
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
    };
    if !name_ok(attr) || sub.is_some_and(|s| !name_ok(s)) {
        return Err(format!("{word:?} is not an attribute path"));
    }
    Ok((
        urn,
        attr.to_ascii_lowercase(),
        sub.map(str::to_ascii_lowercase),
    ))
}

struct Parser {
    toks: Vec<Tok>,
    at: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.at)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.at).cloned();
        self.at += 1;
        t
    }

    fn keyword(&self, k: &str) -> bool {
        matches!(self.peek(), Some(Tok::Word(w)) if w.eq_ignore_ascii_case(k))
    }

    fn expect(&mut self, t: Tok, what: &str) -> Result<(), String> {
        if self.next() == Some(t) {
            Ok(())
        } else {
            Err(format!("expected {what}"))
        }
    }

    fn deeper(&mut self) -> Result<(), String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err("the filter is nested too deeply".into());
        }
        Ok(())
    }

    fn or(&mut self) -> Result<Filter, String> {
        let mut left = self.and()?;
        while self.keyword("or") {
            self.next();
            let right = self.and()?;
            left = Filter::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Filter, String> {
        let mut left = self.unary()?;
        while self.keyword("and") {
            self.next();
            let right = self.unary()?;
            left = Filter::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Filter, String> {
        if self.keyword("not") && self.toks.get(self.at + 1) == Some(&Tok::LParen) {
            self.next();
            self.next();
            self.deeper()?;
            let inner = self.or()?;
            self.depth -= 1;
            self.expect(Tok::RParen, "')'")?;
            return Ok(Filter::Not(Box::new(inner)));
        }
        if self.peek() == Some(&Tok::LParen) {
            self.next();
            self.deeper()?;
            let inner = self.or()?;
            self.depth -= 1;
            self.expect(Tok::RParen, "')'")?;
            return Ok(inner);
        }
        let Some(Tok::Word(word)) = self.next() else {
            return Err("expected an attribute".into());
        };
        let (_, attr, sub) = split_path(&word)?;
        if self.peek() == Some(&Tok::LBracket) {
            if sub.is_some() {
                return Err(format!(
                    "{word:?}: a value filter follows the attribute itself"
                ));
            }
            self.next();
            self.deeper()?;
            let inner = self.or()?;
            self.depth -= 1;
            self.expect(Tok::RBracket, "']'")?;
            // `attr[filter].sub op value`
            if let Some(Tok::Word(w)) = self.peek()
                && let Some(sub) = w.strip_prefix('.')
            {
                let (_, sub, none) = split_path(sub)?;
                if none.is_some() {
                    return Err("one sub-attribute after ']'".into());
                }
                self.next();
                let cond = self.condition(AttrPath {
                    attr: sub,
                    sub: None,
                })?;
                return Ok(Filter::Any(
                    attr,
                    Box::new(Filter::And(Box::new(inner), Box::new(cond))),
                ));
            }
            return Ok(Filter::Any(attr, Box::new(inner)));
        }
        self.condition(AttrPath { attr, sub })
    }

    /// `pr`, or an operator and a value, after an attribute path.
    fn condition(&mut self, path: AttrPath) -> Result<Filter, String> {
        let Some(Tok::Word(op)) = self.next() else {
            return Err("expected an operator (eq, ne, co, sw, ew, gt, lt, ge, le, pr)".into());
        };
        if op.eq_ignore_ascii_case("pr") {
            return Ok(Filter::Present(path));
        }
        let op = Op::parse(&op).ok_or_else(|| format!("unknown operator {op:?}"))?;
        let value = match self.next() {
            Some(Tok::Str(s)) => Literal::Str(s),
            Some(Tok::Word(w)) if w.eq_ignore_ascii_case("true") => Literal::Bool(true),
            Some(Tok::Word(w)) if w.eq_ignore_ascii_case("false") => Literal::Bool(false),
            Some(Tok::Word(w)) if w.eq_ignore_ascii_case("null") => Literal::Null,
            Some(Tok::Word(w)) => match w.parse::<f64>() {
                Ok(n) if n.is_finite() => Literal::Num(n),
                _ => return Err(format!("{w:?} is not a value (strings are quoted)")),
            },
            _ => return Err("expected a value".into()),
        };
        Ok(Filter::Compare(path, op, value))
    }
}

/// Parses `text` as a filter on resources of `schema`, checking every attribute and
/// operator against it (unknown attributes and impossible comparisons are `invalidFilter`).
pub fn parse(text: &str, schema: &Schema) -> Result<Filter, ScimError> {
    if text.len() > MAX_LEN {
        return Err(invalid_filter(format!(
            "the filter is longer than {MAX_LEN} bytes"
        )));
    }
    let toks = tokenize(text).map_err(invalid_filter)?;
    if toks.is_empty() {
        return Err(invalid_filter("the filter is empty"));
    }
    let mut p = Parser {
        toks,
        at: 0,
        depth: 0,
    };
    let f = p.or().map_err(invalid_filter)?;
    if p.at < p.toks.len() {
        return Err(invalid_filter("unexpected text after the filter"));
    }
    // Schema URNs other than the resource's own name attributes it does not have.
    check_urns(text, schema)?;
    check(&f, schema.attrs).map_err(invalid_filter)?;
    Ok(f)
}

fn check_urns(text: &str, schema: &Schema) -> Result<(), ScimError> {
    for tok in tokenize(text).unwrap_or_default() {
        if let Tok::Word(w) = tok
            && let Ok((Some(urn), attr, _)) = split_path(w.trim_start_matches('.'))
            && !urn.eq_ignore_ascii_case(schema.urn)
        {
            return Err(invalid_filter(format!(
                "attribute {attr:?} of schema {urn:?} is not supported in filters"
            )));
        }
    }
    Ok(())
}

fn check(f: &Filter, attrs: &'static [Attr]) -> Result<(), String> {
    match f {
        Filter::Present(p) => resolve(p, attrs).map(|_| ()),
        Filter::Compare(p, op, lit) => {
            let kind = resolve(p, attrs)?;
            let kind = match kind {
                // A multi-valued complex attribute compares its values.
                Kind::Complex(subs) => match find(subs, "value") {
                    Some(v) => v.kind,
                    None => {
                        return Err(format!("{:?} is complex: name a sub-attribute", p.attr));
                    }
                },
                k => k,
            };
            let ok = match (kind, lit) {
                (_, Literal::Null) => matches!(op, Op::Eq | Op::Ne),
                (Kind::Str { .. }, Literal::Str(_)) => true,
                (Kind::Bool, Literal::Bool(_)) => matches!(op, Op::Eq | Op::Ne),
                (Kind::Bool, Literal::Str(s)) => {
                    matches!(op, Op::Eq | Op::Ne) && bool_text(s).is_some()
                }
                (Kind::DateTime, Literal::Str(s)) => {
                    !matches!(op, Op::Co | Op::Sw | Op::Ew) && date(s).is_some()
                }
                _ => false,
            };
            if ok {
                Ok(())
            } else {
                Err(format!(
                    "{} cannot be compared with {op:?} {lit:?}",
                    path_text(p)
                ))
            }
        }
        Filter::Any(attr, inner) => match find(attrs, attr) {
            Some(Attr {
                kind: Kind::Complex(subs),
                ..
            }) => check(inner, subs),
            Some(_) => Err(format!("{attr:?} has no sub-attributes to filter on")),
            None => Err(format!("unknown attribute {attr:?}")),
        },
        Filter::Not(a) => check(a, attrs),
        Filter::And(a, b) | Filter::Or(a, b) => {
            check(a, attrs)?;
            check(b, attrs)
        }
    }
}

fn path_text(p: &AttrPath) -> String {
    match &p.sub {
        Some(s) => format!("{}.{s}", p.attr),
        None => p.attr.clone(),
    }
}

/// The kind of the attribute `p` names.
fn resolve(p: &AttrPath, attrs: &'static [Attr]) -> Result<Kind, String> {
    let a = find(attrs, &p.attr).ok_or_else(|| format!("unknown attribute {:?}", p.attr))?;
    match (&p.sub, a.kind) {
        (None, Kind::Complex(_)) if !a.multi => {
            Err(format!("{:?} is complex: name a sub-attribute", p.attr))
        }
        (None, k) => Ok(k),
        (Some(s), Kind::Complex(subs)) => find(subs, s)
            .map(|x| x.kind)
            .ok_or_else(|| format!("unknown attribute {}", path_text(p))),
        (Some(_), _) => Err(format!("{:?} has no sub-attributes", p.attr)),
    }
}

fn bool_text(s: &str) -> Option<bool> {
    if s.eq_ignore_ascii_case("true") {
        Some(true)
    } else if s.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

fn date(s: &str) -> Option<std::time::SystemTime> {
    humantime::parse_rfc3339_weak(s.trim()).ok()
}

// ---- Evaluation

/// The value of key `name` (any case) of a JSON object.
pub fn get<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    v.as_object()?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

impl Filter {
    /// Whether `resource` (its SCIM JSON, of the schema the filter was parsed for) matches.
    pub fn matches(&self, resource: &Value, schema: &Schema) -> bool {
        eval(self, resource, schema.attrs)
    }
}

fn eval(f: &Filter, v: &Value, attrs: &'static [Attr]) -> bool {
    match f {
        Filter::Present(p) => values(v, p, attrs).iter().any(|x| match x {
            Value::Null => false,
            Value::String(s) => !s.is_empty(),
            Value::Array(a) => !a.is_empty(),
            _ => true,
        }),
        Filter::Compare(p, op, lit) => compare(v, p, *op, lit, attrs),
        Filter::Any(attr, inner) => {
            let subs = match find(attrs, attr) {
                Some(Attr {
                    kind: Kind::Complex(subs),
                    ..
                }) => *subs,
                _ => return false,
            };
            match get(v, attr) {
                Some(Value::Array(items)) => items.iter().any(|i| eval(inner, i, subs)),
                Some(o @ Value::Object(_)) => eval(inner, o, subs),
                _ => false,
            }
        }
        Filter::Not(a) => !eval(a, v, attrs),
        Filter::And(a, b) => eval(a, v, attrs) && eval(b, v, attrs),
        Filter::Or(a, b) => eval(a, v, attrs) || eval(b, v, attrs),
    }
}

/// Every value `p` names in `v` (arrays flattened; a multi-valued complex attribute without a
/// sub-attribute gives its values' `value`).
fn values<'a>(v: &'a Value, p: &AttrPath, attrs: &'static [Attr]) -> Vec<&'a Value> {
    let Some(top) = get(v, &p.attr) else {
        return vec![];
    };
    let complex = matches!(find(attrs, &p.attr).map(|a| a.kind), Some(Kind::Complex(_)));
    let sub = p
        .sub
        .as_deref()
        .or(if complex { Some("value") } else { None });
    let items: Vec<&Value> = match top {
        Value::Array(a) => a.iter().collect(),
        other => vec![other],
    };
    match sub {
        None => items,
        Some(s) => items.into_iter().filter_map(|i| get(i, s)).collect(),
    }
}

fn kind_of(p: &AttrPath, attrs: &'static [Attr]) -> Option<Kind> {
    match resolve(p, attrs).ok()? {
        Kind::Complex(subs) => find(subs, "value").map(|a| a.kind),
        k => Some(k),
    }
}

fn compare(v: &Value, p: &AttrPath, op: Op, lit: &Literal, attrs: &'static [Attr]) -> bool {
    let found = values(v, p, attrs);
    let present: Vec<&Value> = found.into_iter().filter(|x| !x.is_null()).collect();
    if *lit == Literal::Null {
        return (op == Op::Eq) == present.is_empty();
    }
    if op == Op::Ne {
        return !compare(v, p, Op::Eq, lit, attrs);
    }
    let Some(kind) = kind_of(p, attrs) else {
        return false;
    };
    present.iter().any(|x| one(x, kind, op, lit))
}

fn one(x: &Value, kind: Kind, op: Op, lit: &Literal) -> bool {
    match kind {
        Kind::Bool => {
            let want = match lit {
                Literal::Bool(b) => Some(*b),
                Literal::Str(s) => bool_text(s),
                _ => None,
            };
            let have = match x {
                Value::Bool(b) => Some(*b),
                Value::String(s) => bool_text(s),
                _ => None,
            };
            matches!((have, want), (Some(h), Some(w)) if (h == w) == (op == Op::Eq))
        }
        Kind::DateTime => {
            let (Some(have), Literal::Str(w)) = (x.as_str().and_then(date), lit) else {
                return false;
            };
            let Some(want) = date(w) else { return false };
            match op {
                Op::Eq => have == want,
                Op::Ne => have != want,
                Op::Gt => have > want,
                Op::Ge => have >= want,
                Op::Lt => have < want,
                Op::Le => have <= want,
                _ => false,
            }
        }
        Kind::Str { exact } => {
            let (Some(have), Literal::Str(want)) = (x.as_str(), lit) else {
                return false;
            };
            let (have, want) = if exact {
                (have.to_string(), want.clone())
            } else {
                (have.to_lowercase(), want.to_lowercase())
            };
            match op {
                Op::Eq => have == want,
                Op::Ne => have != want,
                Op::Co => have.contains(&want),
                Op::Sw => have.starts_with(&want),
                Op::Ew => have.ends_with(&want),
                Op::Gt => have > want,
                Op::Ge => have >= want,
                Op::Lt => have < want,
                Op::Le => have <= want,
            }
        }
        Kind::Complex(_) => false,
    }
}

impl Filter {
    /// Whether the filter names attribute `attr` (lower case) anywhere.
    pub fn mentions(&self, attr: &str) -> bool {
        match self {
            Filter::Present(p) | Filter::Compare(p, _, _) => p.attr == attr,
            Filter::Any(a, _) => a == attr,
            Filter::Not(a) => a.mentions(attr),
            Filter::And(a, b) | Filter::Or(a, b) => a.mentions(attr) || b.mentions(attr),
        }
    }
}

/// The value an `attr eq "value"` condition at the top of `f` (alone, or in an `and`) asks
/// for: lets a lookup read one record instead of all.
pub fn eq_hint<'a>(f: &'a Filter, attr: &str) -> Option<&'a str> {
    match f {
        Filter::Compare(p, Op::Eq, Literal::Str(s)) if p.attr == attr && p.sub.is_none() => Some(s),
        Filter::And(a, b) => eq_hint(a, attr).or_else(|| eq_hint(b, attr)),
        _ => None,
    }
}

// ---- PATCH paths

/// A PATCH operation's target: `[URN:]attr[[filter]][.sub]`.
#[derive(Debug, Clone, PartialEq)]
pub struct PatchPath {
    /// The schema URN it was qualified with, lower case.
    pub urn: Option<String>,
    pub attr: String,
    pub filter: Option<Filter>,
    pub sub: Option<String>,
}

/// Parses a PATCH path. A value filter is checked against the attribute's sub-attributes when
/// the attribute is one of `schema`'s (others are ignored by the patch, so are not checked).
pub fn parse_path(text: &str, schema: &Schema) -> Result<PatchPath, ScimError> {
    let bad = |d: String| ScimError::bad("invalidPath", d);
    if text.len() > MAX_LEN {
        return Err(bad(format!("the path is longer than {MAX_LEN} bytes")));
    }
    let toks = tokenize(text).map_err(|e| bad(format!("path {text:?}: {e}")))?;
    let mut p = Parser {
        toks,
        at: 0,
        depth: 0,
    };
    let Some(Tok::Word(word)) = p.next() else {
        return Err(bad(format!("{text:?} is not an attribute path")));
    };
    let (urn, attr, mut sub) = split_path(&word).map_err(bad)?;
    let mut filter = None;
    if p.peek() == Some(&Tok::LBracket) {
        if sub.is_some() {
            return Err(bad(format!("{text:?}: the filter follows the attribute")));
        }
        p.next();
        let f = p.or().map_err(|e| bad(format!("path {text:?}: {e}")))?;
        p.expect(Tok::RBracket, "']'")
            .map_err(|e| bad(format!("path {text:?}: {e}")))?;
        if let Some(Tok::Word(w)) = p.peek().cloned() {
            let Some(rest) = w.strip_prefix('.') else {
                return Err(bad(format!("{text:?} is not an attribute path")));
            };
            let (_, s, none) = split_path(rest).map_err(bad)?;
            if none.is_some() {
                return Err(bad(format!("{text:?} is not an attribute path")));
            }
            p.next();
            sub = Some(s);
        }
        let own = urn
            .as_deref()
            .is_none_or(|u| u.eq_ignore_ascii_case(schema.urn));
        if own && let Some(a) = find(schema.attrs, &attr) {
            match a.kind {
                Kind::Complex(subs) => check(&f, subs)
                    .map_err(|e| ScimError::bad("invalidFilter", format!("path {text:?}: {e}")))?,
                _ => return Err(bad(format!("{attr:?} has no values to filter"))),
            }
        }
        filter = Some(f);
    }
    if p.at < p.toks.len() {
        return Err(bad(format!("{text:?} is not an attribute path")));
    }
    Ok(PatchPath {
        urn,
        attr,
        filter,
        sub,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn alice() -> Value {
        json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
            "id": "u-Abc",
            "externalId": "E-1",
            "userName": "Alice@Example.com",
            "displayName": "Alice Liddell",
            "emails": [{"value": "alice@example.com", "type": "work", "primary": true}],
            "active": true,
            "groups": [{"value": "g-1", "display": "engineering"}],
            "meta": {"resourceType": "User", "created": "2024-05-01T10:00:00Z",
                     "lastModified": "2024-06-01T10:00:00Z"}
        })
    }

    #[test]
    fn filters_match_as_the_rfc_says() {
        let u = alice();
        let table: &[(&str, bool)] = &[
            (r#"userName eq "alice@example.com""#, true),
            (r#"USERNAME EQ "ALICE@EXAMPLE.COM""#, true),
            (
                r#"urn:ietf:params:scim:schemas:core:2.0:User:userName eq "alice@example.com""#,
                true,
            ),
            (r#"userName eq "bob""#, false),
            (r#"userName ne "bob""#, true),
            (r#"userName sw "ali""#, true),
            (r#"userName ew ".COM""#, true),
            (r#"userName co "@ex""#, true),
            (r#"userName gt "a""#, true),
            (r#"userName lt "a""#, false),
            (r#"externalId eq "E-1""#, true),
            // externalId is case-exact.
            (r#"externalId eq "e-1""#, false),
            (r#"id eq "u-Abc""#, true),
            (r#"id eq "u-abc""#, false),
            (
                r#"emails[type eq "work"].value eq "ALICE@example.com""#,
                true,
            ),
            (
                r#"emails[type eq "home"].value eq "alice@example.com""#,
                false,
            ),
            (r#"emails[type eq "work" and primary eq true]"#, true),
            (r#"emails.value eq "alice@example.com""#, true),
            (r#"emails eq "alice@example.com""#, true),
            (r#"emails pr"#, true),
            (r#"name.givenName pr"#, false),
            (r#"active eq true"#, true),
            (r#"active eq "True""#, true),
            (r#"active ne true"#, false),
            (r#"groups.value eq "g-1""#, true),
            (r#"groups[display eq "Engineering"]"#, true),
            (r#"meta.lastModified gt "2024-05-15T00:00:00Z""#, true),
            (r#"meta.created ge "2024-05-01T10:00:00Z""#, true),
            (r#"meta.created lt "2024-05-01T10:00:00Z""#, false),
            (r#"displayName eq null"#, false),
            (r#"externalId ne null"#, true),
            (
                r#"userName eq "x" or (displayName co "liddell" and not (active eq false))"#,
                true,
            ),
            (
                r#"userName eq "x" or userName eq "y" and active eq true"#,
                false,
            ),
            (r#"not(userName eq "alice@example.com")"#, false),
            (r#"userName eq "a\"b""#, false),
        ];
        for (text, want) in table {
            let f = parse(text, &USER).unwrap_or_else(|e| panic!("{text}: {}", e.detail));
            assert_eq!(f.matches(&u, &USER), *want, "{text}");
        }
    }

    #[test]
    fn and_binds_tighter_than_or() {
        let f = parse(
            r#"userName eq "a" or userName eq "b" and active eq true"#,
            &USER,
        )
        .unwrap();
        assert!(matches!(f, Filter::Or(_, _)), "{f:?}");
    }

    #[test]
    fn bad_filters_are_invalid_filter_errors() {
        let deep = format!("{}userName pr{}", "(".repeat(100), ")".repeat(100));
        let long = format!("userName eq \"{}\"", "x".repeat(MAX_LEN));
        let table: Vec<&str> = vec![
            "",
            "   ",
            "userName",
            "userName eq",
            r#"userName xx "a""#,
            r#"userName eq "a"#,
            r#"userName eq a"#,
            r#"userName eq "a" and"#,
            r#"(userName eq "a""#,
            r#"userName eq "a")"#,
            r#"emails[type eq "work""#,
            r#"title eq "boss""#,
            r#"name eq "x""#,
            r#"active gt true"#,
            r#"active eq "maybe""#,
            r#"userName eq 5"#,
            r#"userName eq true"#,
            r#"meta.created eq "yesterday""#,
            r#"meta.created co "2024""#,
            r#"emails[kind eq "work"]"#,
            r#"userName[value eq "x"]"#,
            r#"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber eq "1""#,
            r#"userName eq "a" ; drop"#,
            r#"userName.first eq "a""#,
            r#"1abc eq "a""#,
            r#"userName eq "bad \q escape""#,
            &deep,
            &long,
        ];
        for text in table {
            let e = parse(text, &USER).expect_err(text);
            assert_eq!(e.status, 400, "{text}");
            assert_eq!(e.scim_type, Some("invalidFilter"), "{text}");
        }
    }

    #[test]
    fn group_filters() {
        let g = json!({"id": "g-1", "displayName": "Engineering",
            "members": [{"value": "u-1", "display": "alice"}, {"value": "u-2"}]});
        for (text, want) in [
            (r#"displayName eq "engineering""#, true),
            (r#"members[value eq "u-2"]"#, true),
            (r#"members.value eq "U-2""#, false),
            (r#"members eq "u-1""#, true),
        ] {
            assert_eq!(
                parse(text, &GROUP).unwrap().matches(&g, &GROUP),
                want,
                "{text}"
            );
        }
        assert!(parse(r#"userName eq "x""#, &GROUP).is_err());
    }

    #[test]
    fn hints_find_top_level_equality() {
        let f = parse(r#"userName eq "Alice" and active eq true"#, &USER).unwrap();
        assert_eq!(eq_hint(&f, "username"), Some("Alice"));
        let f = parse(r#"userName eq "a" or userName eq "b""#, &USER).unwrap();
        assert_eq!(eq_hint(&f, "username"), None);
        let f = parse(r#"externalId eq "x""#, &USER).unwrap();
        assert_eq!(eq_hint(&f, "externalid"), Some("x"));
        assert_eq!(eq_hint(&f, "username"), None);
    }

    #[test]
    fn patch_paths() {
        let p = parse_path(r#"emails[type eq "work"].value"#, &USER).unwrap();
        assert_eq!(
            (p.attr.as_str(), p.sub.as_deref()),
            ("emails", Some("value"))
        );
        assert!(p.filter.is_some());
        let p = parse_path("name.givenName", &USER).unwrap();
        assert_eq!(
            (p.attr.as_str(), p.sub.as_deref()),
            ("name", Some("givenname"))
        );
        let p = parse_path(
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager.value",
            &USER,
        )
        .unwrap();
        assert_eq!(
            p.urn.as_deref(),
            Some("urn:ietf:params:scim:schemas:extension:enterprise:2.0:user")
        );
        assert_eq!(
            (p.attr.as_str(), p.sub.as_deref()),
            ("manager", Some("value"))
        );
        let p = parse_path(r#"members[value eq "u-1"]"#, &GROUP).unwrap();
        assert_eq!(p.attr, "members");
        // Unknown attributes parse (the patch ignores them), filter and all.
        assert!(parse_path(r#"phoneNumbers[type eq "work"].value"#, &USER).is_ok());
        for bad in [
            "",
            "[x]",
            "emails[",
            r#"emails[type eq "work"]value"#,
            r#"emails[type eq "work"].value.x"#,
            "a.b.c",
            "userName extra",
            r#"members[nope eq "x"]"#,
            r#"userName[value eq "x"]"#,
            "emails]",
        ] {
            let e = parse_path(
                bad,
                if bad.contains("members") {
                    &GROUP
                } else {
                    &USER
                },
            )
            .expect_err(bad);
            assert_eq!(e.status, 400, "{bad}");
            assert!(
                matches!(e.scim_type, Some("invalidPath" | "invalidFilter")),
                "{bad}: {:?}",
                e.scim_type
            );
        }
    }
}
