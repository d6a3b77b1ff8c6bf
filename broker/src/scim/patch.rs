//! SCIM PATCH (RFC 7644 §3.5.2) applied to the attributes Sekisho keeps of a user or a group.
//! Pure: the operations are parsed and applied in memory; the caller writes the result.
//!
//! Accepted as the RFC and the provisioning clients of Entra ID and Okta send them: `op` in any
//! case; operations with a path, and `add`/`replace` without one whose value holds attributes
//! (dotted names like `name.givenName` included); booleans as text ("False"). Attributes
//! Sekisho does not keep (titles, phone numbers, the enterprise extension…) are accepted and
//! ignored; read-only ones (`id`, `meta`, a user's `groups`) cannot be targeted.

use std::collections::HashSet;

use serde_json::{Value, json};

use super::ScimError;
use super::filter::{self, PatchPath, Schema, get};
use super::resource::{self, GroupAttrs, Member, UserAttrs};

/// Most operations one PATCH may hold.
pub const MAX_OPERATIONS: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Add,
    Replace,
    Remove,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PatchOp {
    pub op: OpKind,
    pub path: Option<PatchPath>,
    pub value: Option<Value>,
}

fn syntax(detail: impl Into<String>) -> ScimError {
    ScimError::bad("invalidSyntax", detail)
}

fn mutability(detail: impl Into<String>) -> ScimError {
    ScimError::bad("mutability", detail)
}

fn invalid(detail: impl Into<String>) -> ScimError {
    ScimError::bad("invalidValue", detail)
}

/// The operations of a PatchOp request body, paths parsed against `schema`.
pub fn parse(body: &Value, schema: &Schema) -> Result<Vec<PatchOp>, ScimError> {
    if !body.is_object() {
        return Err(syntax("the body must be a PatchOp JSON object"));
    }
    if let Some(s) = get(body, "schemas") {
        let listed = s.as_array().is_some_and(|a| {
            a.iter().any(|u| {
                u.as_str()
                    .is_some_and(|u| u.eq_ignore_ascii_case(resource::PATCH_OP))
            })
        });
        if !listed {
            return Err(syntax(format!("schemas must list {}", resource::PATCH_OP)));
        }
    }
    let Some(Value::Array(ops)) = get(body, "Operations") else {
        return Err(syntax("Operations must be a list"));
    };
    if ops.is_empty() {
        return Err(syntax("Operations is empty"));
    }
    if ops.len() > MAX_OPERATIONS {
        return Err(syntax(format!(
            "at most {MAX_OPERATIONS} operations in one request"
        )));
    }
    ops.iter()
        .map(|o| {
            if !o.is_object() {
                return Err(syntax("each operation must be an object"));
            }
            let op = match get(o, "op")
                .and_then(Value::as_str)
                .map(str::to_ascii_lowercase)
            {
                Some(op) if op == "add" => OpKind::Add,
                Some(op) if op == "replace" => OpKind::Replace,
                Some(op) if op == "remove" => OpKind::Remove,
                _ => return Err(syntax("op must be add, replace or remove")),
            };
            let path = match get(o, "path") {
                None | Some(Value::Null) => None,
                Some(Value::String(p)) if p.trim().is_empty() => None,
                Some(Value::String(p)) => Some(filter::parse_path(p.trim(), schema)?),
                Some(_) => return Err(ScimError::bad("invalidPath", "path must be a string")),
            };
            let value = get(o, "value").cloned();
            match (op, &path, &value) {
                (OpKind::Remove, None, _) => Err(ScimError::bad("noTarget", "remove needs a path")),
                (OpKind::Add | OpKind::Replace, _, None) => {
                    Err(syntax("add and replace need a value"))
                }
                (OpKind::Add | OpKind::Replace, None, Some(v)) if !v.is_object() => Err(syntax(
                    "without a path, the value must be an object of attributes",
                )),
                _ => Ok(PatchOp { op, path, value }),
            }
        })
        .collect()
}

/// Whether a path qualified with a schema URN is one of `schema`'s (else an extension's,
/// which Sekisho does not keep).
fn own(path: &PatchPath, schema: &Schema) -> bool {
    path.urn
        .as_deref()
        .is_none_or(|u| u.eq_ignore_ascii_case(schema.urn))
}

/// The (path, value) pairs an operation without a path sets: the value's attributes, with a
/// nested core schema object flattened and other schema URNs (extensions) left out.
fn pathless(value: &Value, schema: &Schema) -> Result<Vec<(PatchPath, Value)>, ScimError> {
    let mut out = Vec::new();
    for (k, v) in value.as_object().into_iter().flatten() {
        if k.eq_ignore_ascii_case(schema.urn) {
            if v.is_object() {
                out.extend(pathless(v, schema)?);
            }
            continue;
        }
        if k.len() > 4
            && k.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("urn:"))
            && !k.contains(['.', '['])
        {
            // urn:…:Extension (an object of its attributes) or urn:…:User:attr.
            let p = filter::parse_path(k, schema)?;
            if own(&p, schema) {
                out.push((p, v.clone()));
            }
            continue;
        }
        let p = filter::parse_path(k, schema)?;
        match p.attr.as_str() {
            // What a client echoes from a resource it read.
            "id" | "meta" | "schemas" | "groups" if p.urn.is_none() => continue,
            _ => out.push((p, v.clone())),
        }
    }
    Ok(out)
}

/// `attrs` after the operations, in order. All or nothing.
pub fn user(attrs: &UserAttrs, ops: &[PatchOp]) -> Result<UserAttrs, ScimError> {
    let schema = &filter::USER;
    let mut u = attrs.clone();
    for o in ops {
        match &o.path {
            Some(p) => user_one(&mut u, o.op, p, o.value.as_ref())?,
            None => {
                for (p, v) in pathless(o.value.as_ref().unwrap_or(&Value::Null), schema)? {
                    user_one(&mut u, o.op, &p, Some(&v))?;
                }
            }
        }
    }
    Ok(u)
}

fn plain(p: &PatchPath) -> Result<(), ScimError> {
    if p.filter.is_some() || p.sub.is_some() {
        return Err(ScimError::bad(
            "invalidPath",
            format!("{} has no sub-attributes or values to select", p.attr),
        ));
    }
    Ok(())
}

fn user_one(
    u: &mut UserAttrs,
    op: OpKind,
    p: &PatchPath,
    value: Option<&Value>,
) -> Result<(), ScimError> {
    if !own(p, &filter::USER) {
        return Ok(());
    }
    let null = Value::Null;
    let v = value.unwrap_or(&null);
    match p.attr.as_str() {
        "username" => {
            plain(p)?;
            if op == OpKind::Remove {
                return Err(invalid("userName is required"));
            }
            u.user_name = resource::user_name(v)?;
        }
        "displayname" => {
            plain(p)?;
            u.display_name = match op {
                OpKind::Remove => None,
                _ => resource::text("displayName", v)?,
            };
        }
        "externalid" => {
            plain(p)?;
            u.external_id = match op {
                OpKind::Remove => None,
                _ => resource::text("externalId", v)?,
            };
        }
        "active" => {
            plain(p)?;
            if op == OpKind::Remove {
                return Err(mutability(
                    "active cannot be removed: set it to true or false",
                ));
            }
            u.active = resource::boolean("active", v)?;
        }
        "emails" => email(u, op, p, v)?,
        "id" | "meta" | "groups" => {
            return Err(mutability(format!(
                "{} is read-only{}",
                p.attr,
                if p.attr == "groups" {
                    ": change the group's members instead"
                } else {
                    ""
                }
            )));
        }
        // Not kept (name parts, titles, phone numbers, addresses, passwords…): ignored.
        _ => {}
    }
    Ok(())
}

/// The one e-mail address Sekisho keeps, as the element of `emails` it is.
fn email_element(address: &str) -> Value {
    json!({"value": address, "type": "work", "primary": true})
}

fn email(u: &mut UserAttrs, op: OpKind, p: &PatchPath, v: &Value) -> Result<(), ScimError> {
    match (&p.filter, p.sub.as_deref()) {
        (None, None) => match op {
            OpKind::Remove => {
                // With a value: only those addresses.
                let gone = match v {
                    Value::Null => true,
                    v => {
                        let listed: Vec<&Value> = match v {
                            Value::Array(a) => a.iter().collect(),
                            o => vec![o],
                        };
                        listed.iter().any(|e| {
                            get(e, "value")
                                .and_then(Value::as_str)
                                .zip(u.email.as_deref())
                                .is_some_and(|(a, b)| a.eq_ignore_ascii_case(b))
                        })
                    }
                };
                if gone {
                    u.email = None;
                }
            }
            OpKind::Add => {
                if let Some(e) = resource::pick_email(v)? {
                    u.email = Some(e);
                }
            }
            OpKind::Replace => u.email = resource::pick_email(v)?,
        },
        (None, Some("value")) => match op {
            OpKind::Remove => u.email = None,
            _ => u.email = resource::text("emails.value", v)?,
        },
        (None, Some(_)) => {}
        (Some(f), sub) => {
            // The address kept is the work and primary one: a selection that matches it
            // changes it; one that would match a new work address sets it when there is none;
            // others (home addresses…) are not kept.
            let any = filter::Filter::Any("emails".into(), Box::new(f.clone()));
            let hits = |address: &str| {
                any.matches(&json!({"emails": [email_element(address)]}), &filter::USER)
            };
            let new = match (op, sub) {
                (OpKind::Remove, _) => None,
                (_, None) => match v {
                    Value::Object(_) => {
                        resource::text("emails.value", get(v, "value").unwrap_or(&Value::Null))?
                    }
                    Value::Array(a) if a.len() == 1 => {
                        resource::text("emails.value", get(&a[0], "value").unwrap_or(&Value::Null))?
                    }
                    _ => return Err(invalid("the selected e-mail must be an object")),
                },
                (_, Some("value")) => resource::text("emails.value", v)?,
                // type, primary, display: the address kept is always the primary work one.
                (_, Some(_)) => return Ok(()),
            };
            match (&u.email, op) {
                (Some(cur), _) if hits(cur) => u.email = new,
                (None, OpKind::Add | OpKind::Replace) => {
                    if let Some(n) = &new
                        && hits(n)
                    {
                        u.email = new;
                    }
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// `attrs` after the operations, in order. All or nothing. Members added are new references
/// (the caller checks they are users).
pub fn group(attrs: &GroupAttrs, ops: &[PatchOp]) -> Result<GroupAttrs, ScimError> {
    let schema = &filter::GROUP;
    let mut g = attrs.clone();
    for o in ops {
        match &o.path {
            Some(p) => group_one(&mut g, o.op, p, o.value.as_ref())?,
            None => {
                for (p, v) in pathless(o.value.as_ref().unwrap_or(&Value::Null), schema)? {
                    group_one(&mut g, o.op, &p, Some(&v))?;
                }
            }
        }
        if g.members.len() > resource::MAX_MEMBERS * 10 {
            return Err(invalid("too many members"));
        }
    }
    Ok(g)
}

fn group_one(
    g: &mut GroupAttrs,
    op: OpKind,
    p: &PatchPath,
    value: Option<&Value>,
) -> Result<(), ScimError> {
    if !own(p, &filter::GROUP) {
        return Ok(());
    }
    let null = Value::Null;
    let v = value.unwrap_or(&null);
    match p.attr.as_str() {
        "displayname" => {
            plain(p)?;
            if op == OpKind::Remove {
                return Err(invalid("displayName is required"));
            }
            g.display_name = resource::group_name(v)?;
        }
        "externalid" => {
            plain(p)?;
            g.external_id = match op {
                OpKind::Remove => None,
                _ => resource::text("externalId", v)?,
            };
        }
        "members" => members(g, op, p, v)?,
        "id" | "meta" => return Err(mutability(format!("{} is read-only", p.attr))),
        _ => {}
    }
    Ok(())
}

fn members(g: &mut GroupAttrs, op: OpKind, p: &PatchPath, v: &Value) -> Result<(), ScimError> {
    if p.sub.is_some() {
        return Err(ScimError::bad(
            "invalidPath",
            "members are added and removed whole: use members or members[value eq \"ID\"]",
        ));
    }
    match (&p.filter, op) {
        (None, OpKind::Add) => {
            let mut have: HashSet<String> = g.members.iter().map(|m| m.value.clone()).collect();
            for m in resource::members(v)? {
                if have.insert(m.value.clone()) {
                    g.members.push(m);
                }
            }
        }
        (None, OpKind::Replace) => g.members = resource::members(v)?,
        (None, OpKind::Remove) => {
            if v.is_null() {
                g.members.clear();
            } else {
                let gone: HashSet<String> =
                    resource::members(v)?.into_iter().map(|m| m.value).collect();
                g.members.retain(|m| !gone.contains(&m.value));
            }
        }
        (Some(f), OpKind::Remove) => {
            let schema = &filter::GROUP;
            let any = filter::Filter::Any("members".into(), Box::new(f.clone()));
            g.members.retain(|m: &Member| {
                let mut e = json!({"value": m.value, "type": "User"});
                if let Some(d) = &m.display {
                    e["display"] = json!(d);
                }
                !any.matches(&json!({"members": [e]}), schema)
            });
        }
        (Some(_), _) => {
            return Err(ScimError::bad(
                "invalidPath",
                "a selection of members can only be removed; add members with path \"members\"",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> UserAttrs {
        UserAttrs {
            user_name: "alice".into(),
            external_id: Some("e-1".into()),
            display_name: Some("Alice".into()),
            email: Some("alice@example.com".into()),
            active: true,
        }
    }

    fn ops(list: Value) -> Vec<PatchOp> {
        parse(
            &json!({"schemas": [resource::PATCH_OP], "Operations": list}),
            &filter::USER,
        )
        .unwrap()
    }

    fn patched(list: Value) -> UserAttrs {
        user(&alice(), &ops(list)).unwrap()
    }

    #[test]
    fn user_patches_as_entra_and_okta_send_them() {
        // Entra ID: replace without a path, the value an object.
        assert!(!patched(json!([{"op": "Replace", "value": {"active": false}}])).active);
        // Entra ID: booleans as text.
        assert!(!patched(json!([{"op": "replace", "path": "active", "value": "False"}])).active);
        assert!(patched(json!([{"op": "replace", "path": "active", "value": "True"}])).active);
        let u = patched(json!([
            {"op": "replace", "path": "userName", "value": "alice@example.com"},
            {"op": "Add", "path": "displayName", "value": "Alice L."},
            {"op": "replace", "path": "externalId", "value": "e-2"},
            {"op": "add", "path": "name.givenName", "value": "Alice"},
            {"op": "add", "path": "title", "value": "Engineer"},
            {"op": "add", "path": "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department", "value": "R&D"},
            {"op": "replace", "path": "emails[type eq \"work\"].value", "value": "al@example.com"},
        ]));
        assert_eq!(u.user_name, "alice@example.com");
        assert_eq!(u.display_name.as_deref(), Some("Alice L."));
        assert_eq!(u.external_id.as_deref(), Some("e-2"));
        assert_eq!(u.email.as_deref(), Some("al@example.com"));
        // Dotted and URN-qualified names inside a value; read-only echoes ignored.
        let u = patched(json!([{"op": "replace", "value": {
            "urn:ietf:params:scim:schemas:core:2.0:User:userName": "a2",
            "name.familyName": "L", "id": "u-x", "meta": {},
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User": {"employeeNumber": "7"},
            "urn:ietf:params:scim:schemas:core:2.0:User": {"displayName": "A2"},
        }}]));
        assert_eq!(u.user_name, "a2");
        assert_eq!(u.display_name.as_deref(), Some("A2"));
        // Removing.
        let u = patched(json!([
            {"op": "remove", "path": "displayName"},
            {"op": "remove", "path": "emails[type eq \"work\"]"},
            {"op": "remove", "path": "externalId"},
        ]));
        assert_eq!((u.display_name, u.email, u.external_id), (None, None, None));
        // A home address is not the one kept.
        let u = patched(
            json!([{"op": "add", "path": "emails[type eq \"home\"].value", "value": "h@x.org"}]),
        );
        assert_eq!(u.email.as_deref(), Some("alice@example.com"));
        // With no address yet, a work address selection sets it (Entra ID sends these).
        let mut none = alice();
        none.email = None;
        let u = user(&none, &ops(json!([{"op": "replace", "path": "emails[type eq \"work\"].value", "value": "new@x.org"}]))).unwrap();
        assert_eq!(u.email.as_deref(), Some("new@x.org"));
        let u = patched(
            json!([{"op": "replace", "path": "emails", "value": [{"value": "p@x.org", "primary": true}, {"value": "w@x.org", "type": "work"}]}]),
        );
        assert_eq!(u.email.as_deref(), Some("p@x.org"));
        // Nothing asked: nothing changes.
        assert_eq!(
            patched(json!([{"op": "add", "path": "nickName", "value": "Al"}])),
            alice()
        );
    }

    #[test]
    fn bad_user_patches_are_errors() {
        let table: &[(Value, &str)] = &[
            (json!({"Operations": []}), "invalidSyntax"),
            (json!({"Operations": "x"}), "invalidSyntax"),
            (json!({"operations": [1]}), "invalidSyntax"),
            (json!([]), "invalidSyntax"),
            (
                json!({"schemas": ["urn:x"], "Operations": [{"op": "add", "path": "displayName", "value": "x"}]}),
                "invalidSyntax",
            ),
            (
                json!({"Operations": [{"op": "move", "path": "displayName", "value": "x"}]}),
                "invalidSyntax",
            ),
            (json!({"Operations": [{"op": "remove"}]}), "noTarget"),
            (
                json!({"Operations": [{"op": "add", "path": "displayName"}]}),
                "invalidSyntax",
            ),
            (
                json!({"Operations": [{"op": "replace", "value": "x"}]}),
                "invalidSyntax",
            ),
            (
                json!({"Operations": [{"op": "replace", "path": 5, "value": "x"}]}),
                "invalidPath",
            ),
            (
                json!({"Operations": [{"op": "replace", "path": "emails[type eq]", "value": "x"}]}),
                "invalidPath",
            ),
            (
                json!({"Operations": [{"op": "replace", "path": "emails[kind eq \"x\"]", "value": "x"}]}),
                "invalidFilter",
            ),
        ];
        for (body, kind) in table {
            let e = parse(body, &filter::USER).expect_err(&body.to_string());
            assert_eq!(e.scim_type, Some(*kind), "{body}");
        }
        let applied: &[(Value, &str)] = &[
            (
                json!([{"op": "remove", "path": "userName"}]),
                "invalidValue",
            ),
            (
                json!([{"op": "replace", "path": "userName", "value": "bad name"}]),
                "invalidValue",
            ),
            (
                json!([{"op": "replace", "path": "userName", "value": 7}]),
                "invalidValue",
            ),
            (
                json!([{"op": "replace", "path": "active", "value": "nope"}]),
                "invalidValue",
            ),
            (json!([{"op": "remove", "path": "active"}]), "mutability"),
            (
                json!([{"op": "add", "path": "groups", "value": [{"value": "g-1"}]}]),
                "mutability",
            ),
            (
                json!([{"op": "replace", "path": "id", "value": "u-2"}]),
                "mutability",
            ),
            (
                json!([{"op": "replace", "path": "userName.x", "value": "a"}]),
                "invalidPath",
            ),
            (
                json!([{"op": "replace", "value": {"active": 3}}]),
                "invalidValue",
            ),
            (
                json!([{"op": "replace", "value": {"bad key!": 3}}]),
                "invalidPath",
            ),
            (
                json!([{"op": "replace", "path": "emails", "value": "x@y"}]),
                "invalidValue",
            ),
        ];
        for (list, kind) in applied {
            let e = user(&alice(), &ops(list.clone())).expect_err(&list.to_string());
            assert_eq!(e.scim_type, Some(*kind), "{list}");
            assert_eq!(e.status, 400);
        }
    }

    fn eng() -> GroupAttrs {
        GroupAttrs {
            display_name: "engineering".into(),
            external_id: None,
            members: vec![
                Member {
                    value: "u-1".into(),
                    display: Some("alice".into()),
                },
                Member {
                    value: "u-2".into(),
                    display: Some("bob".into()),
                },
            ],
        }
    }

    fn gpatch(list: Value) -> Result<GroupAttrs, ScimError> {
        let ops = parse(&json!({"Operations": list}), &filter::GROUP)?;
        group(&eng(), &ops)
    }

    fn ids(g: &GroupAttrs) -> Vec<&str> {
        g.members.iter().map(|m| m.value.as_str()).collect()
    }

    #[test]
    fn group_patches() {
        let g = gpatch(json!([{"op": "Add", "path": "members", "value": [{"value": "u-3"}, {"value": "u-1"}]}])).unwrap();
        assert_eq!(ids(&g), ["u-1", "u-2", "u-3"]);
        let g = gpatch(json!([{"op": "remove", "path": "members[value eq \"u-1\"]"}])).unwrap();
        assert_eq!(ids(&g), ["u-2"]);
        let g = gpatch(json!([{"op": "remove", "path": "members[display eq \"BOB\"]"}])).unwrap();
        assert_eq!(ids(&g), ["u-1"]);
        // Entra ID removes with a value.
        let g = gpatch(json!([{"op": "Remove", "path": "members", "value": [{"value": "u-2"}]}]))
            .unwrap();
        assert_eq!(ids(&g), ["u-1"]);
        let g = gpatch(json!([{"op": "remove", "path": "members"}])).unwrap();
        assert!(g.members.is_empty());
        let g = gpatch(json!([{"op": "replace", "path": "members", "value": [{"value": "u-9"}]}]))
            .unwrap();
        assert_eq!(ids(&g), ["u-9"]);
        // Okta renames without a path.
        let g =
            gpatch(json!([{"op": "replace", "value": {"id": "g-1", "displayName": "Eng Team"}}]))
                .unwrap();
        assert_eq!(g.display_name, "Eng Team");
        assert_eq!(ids(&g), ["u-1", "u-2"]);
        let g = gpatch(json!([{"op": "add", "value": {"members": [{"value": "u-4"}]}}])).unwrap();
        assert_eq!(ids(&g), ["u-1", "u-2", "u-4"]);
        let g = gpatch(json!([{"op": "replace", "path": "externalId", "value": "x-1"}])).unwrap();
        assert_eq!(g.external_id.as_deref(), Some("x-1"));
        for (list, kind) in [
            (
                json!([{"op": "remove", "path": "displayName"}]),
                "invalidValue",
            ),
            (
                json!([{"op": "replace", "path": "displayName", "value": ""}]),
                "invalidValue",
            ),
            (
                json!([{"op": "add", "path": "members", "value": [{"value": "g-2", "type": "Group"}]}]),
                "invalidValue",
            ),
            (
                json!([{"op": "add", "path": "members", "value": [{"display": "x"}]}]),
                "invalidValue",
            ),
            (
                json!([{"op": "add", "path": "members", "value": "u-1"}]),
                "invalidValue",
            ),
            (
                json!([{"op": "replace", "path": "members[value eq \"u-1\"]", "value": {"value": "u-3"}}]),
                "invalidPath",
            ),
            (
                json!([{"op": "remove", "path": "members.value"}]),
                "invalidPath",
            ),
            (
                json!([{"op": "remove", "path": "members[nope eq \"u-1\"]"}]),
                "invalidFilter",
            ),
            (
                json!([{"op": "replace", "path": "meta", "value": {}}]),
                "mutability",
            ),
        ] {
            let e = gpatch(list.clone()).expect_err(&list.to_string());
            assert_eq!(e.scim_type, Some(kind), "{list}");
        }
    }

    #[test]
    fn no_input_panics() {
        // Odd shapes anywhere: an error or a result, never a panic.
        let values = [
            json!(null),
            json!(1),
            json!("x"),
            json!([]),
            json!({}),
            json!([[]]),
            json!([{}]),
            json!({"value": null}),
            json!([{"value": 1}]),
            json!({"a": {"b": []}}),
            // A key whose fourth byte is inside a character.
            json!({"abcé": 1}),
            json!({"urné": {"x": 1}}),
        ];
        let paths = [
            json!(null),
            json!("members"),
            json!("emails"),
            json!("emails.value"),
            json!("emails[value pr]"),
            json!("emails[type eq \"work\"].type"),
            json!("name"),
            json!("members[value eq \"u-1\"]"),
            json!("displayName"),
            json!("active"),
            json!("urn:x:y"),
            json!("urn:"),
            json!("]["),
        ];
        for op in ["add", "replace", "remove"] {
            for p in &paths {
                for v in &values {
                    let body = json!({"Operations": [{"op": op, "path": p, "value": v}]});
                    if let Ok(o) = parse(&body, &filter::USER) {
                        let _ = user(&alice(), &o);
                    }
                    if let Ok(o) = parse(&body, &filter::GROUP) {
                        let _ = group(&eng(), &o);
                    }
                }
            }
        }
    }
}
