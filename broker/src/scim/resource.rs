//! SCIM resources as JSON (RFC 7643): users and groups from their store records, request
//! bodies into the attributes Sekisho keeps, list responses and paging, attribute selection,
//! and the discovery documents (service provider configuration, resource types, schemas).
//! Pure: no I/O.

use serde_json::{Map, Value, json};

use super::ScimError;
use super::filter::get;
use crate::store::scim::{ScimGroupRecord, ScimUserRecord};

pub const USER_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
pub const GROUP_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:Group";
pub const LIST_RESPONSE: &str = "urn:ietf:params:scim:api:messages:2.0:ListResponse";
pub const PATCH_OP: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";
#[cfg(test)]
pub const SEARCH_REQUEST: &str = "urn:ietf:params:scim:api:messages:2.0:SearchRequest";
pub const ERROR: &str = "urn:ietf:params:scim:api:messages:2.0:Error";
const SP_CONFIG: &str = "urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig";
const RESOURCE_TYPE: &str = "urn:ietf:params:scim:schemas:core:2.0:ResourceType";
const SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:Schema";

/// Most resources one list response holds (`count` above it is lowered to it).
pub const MAX_RESULTS: usize = 200;
/// Most members one request may name.
pub const MAX_MEMBERS: usize = 10_000;
/// Longest `displayName`, `externalId` or e-mail address kept.
const MAX_TEXT: usize = 256;
/// Longest group name.
pub const MAX_GROUP_NAME: usize = 128;

/// Unix seconds as SCIM's dateTime (RFC 3339, UTC).
pub fn time(unix: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix))
        .to_string()
}

/// The writable attributes of a user, as Sekisho keeps them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserAttrs {
    pub user_name: String,
    pub external_id: Option<String>,
    pub display_name: Option<String>,
    /// The one e-mail address kept (the primary or work one).
    pub email: Option<String>,
    pub active: bool,
}

impl UserAttrs {
    pub fn of(u: &ScimUserRecord) -> UserAttrs {
        UserAttrs {
            user_name: u.name.clone(),
            external_id: u.external_id.clone(),
            display_name: u.display_name.clone(),
            email: u.email.clone(),
            active: !u.disabled,
        }
    }
}

/// A group member: a user's SCIM id (and name, when known).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub value: String,
    pub display: Option<String>,
}

/// The writable attributes of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupAttrs {
    pub display_name: String,
    pub external_id: Option<String>,
    pub members: Vec<Member>,
}

impl GroupAttrs {
    pub fn of(g: &ScimGroupRecord) -> GroupAttrs {
        GroupAttrs {
            display_name: g.name.clone(),
            external_id: g.external_id.clone(),
            members: g
                .members
                .iter()
                .flatten()
                .map(|(id, name)| Member {
                    value: id.clone(),
                    display: Some(name.clone()),
                })
                .collect(),
        }
    }
}

fn meta(kind: &str, created: u64, modified: u64, location: String) -> Value {
    json!({
        "resourceType": kind,
        "created": time(created),
        "lastModified": time(modified.max(created)),
        "location": location,
    })
}

/// A user's SCIM JSON; `base` is the `/scim/v2` URL.
pub fn user_json(u: &ScimUserRecord, base: &str) -> Value {
    let mut m = Map::new();
    m.insert("schemas".into(), json!([USER_SCHEMA]));
    m.insert("id".into(), json!(u.id));
    if let Some(x) = &u.external_id {
        m.insert("externalId".into(), json!(x));
    }
    m.insert("userName".into(), json!(u.name));
    if let Some(d) = &u.display_name {
        m.insert("name".into(), json!({ "formatted": d }));
        m.insert("displayName".into(), json!(d));
    }
    if let Some(e) = &u.email {
        m.insert(
            "emails".into(),
            json!([{"value": e, "type": "work", "primary": true}]),
        );
    }
    m.insert("active".into(), json!(!u.disabled));
    if !u.groups.is_empty() {
        let groups: Vec<Value> = u
            .groups
            .iter()
            .map(|(id, name)| {
                json!({"value": id, "display": name, "type": "direct",
                    "$ref": format!("{base}/Groups/{id}")})
            })
            .collect();
        m.insert("groups".into(), Value::Array(groups));
    }
    m.insert(
        "meta".into(),
        meta(
            "User",
            u.created_at,
            u.updated_at,
            format!("{base}/Users/{}", u.id),
        ),
    );
    Value::Object(m)
}

/// A group's SCIM JSON (members only when they were read).
pub fn group_json(g: &ScimGroupRecord, base: &str) -> Value {
    let mut m = Map::new();
    m.insert("schemas".into(), json!([GROUP_SCHEMA]));
    m.insert("id".into(), json!(g.id));
    if let Some(x) = &g.external_id {
        m.insert("externalId".into(), json!(x));
    }
    m.insert("displayName".into(), json!(g.name));
    if let Some(members) = &g.members {
        let list: Vec<Value> = members
            .iter()
            .map(|(id, name)| {
                json!({"value": id, "display": name, "type": "User",
                    "$ref": format!("{base}/Users/{id}")})
            })
            .collect();
        m.insert("members".into(), Value::Array(list));
    }
    m.insert(
        "meta".into(),
        meta(
            "Group",
            g.created_at,
            g.updated_at,
            format!("{base}/Groups/{}", g.id),
        ),
    );
    Value::Object(m)
}

fn invalid(detail: impl Into<String>) -> ScimError {
    ScimError::bad("invalidValue", detail)
}

/// A text attribute: a string (trimmed; empty counts as none) or null, bounded, without
/// control characters.
pub fn text(field: &str, v: &Value) -> Result<Option<String>, ScimError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => {
            let s = s.trim();
            if s.chars().count() > MAX_TEXT {
                return Err(invalid(format!(
                    "{field} is longer than {MAX_TEXT} characters"
                )));
            }
            if s.chars().any(char::is_control) {
                return Err(invalid(format!("{field} has control characters")));
            }
            Ok((!s.is_empty()).then(|| s.to_string()))
        }
        _ => Err(invalid(format!("{field} must be a string"))),
    }
}

/// A boolean, or its text in any case ("True", as Entra ID sends).
pub fn boolean(field: &str, v: &Value) -> Result<bool, ScimError> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Ok(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Ok(false),
        _ => Err(invalid(format!("{field} must be true or false"))),
    }
}

/// A user name: see [`crate::control::valid_user_name`].
pub fn user_name(v: &Value) -> Result<String, ScimError> {
    let Some(name) = text("userName", v)? else {
        return Err(invalid("userName is required"));
    };
    if !crate::control::valid_user_name(&name) {
        return Err(invalid(format!(
            "userName {name:?} is not a Sekisho user name: use 1-128 letters, digits, '-', '_', \
             '.', '@' or '+'"
        )));
    }
    Ok(name)
}

/// A group name: 1-128 characters, no control characters, no spaces at either end.
pub fn group_name(v: &Value) -> Result<String, ScimError> {
    let name = match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        _ => return Err(invalid("displayName must be a string")),
    };
    if name.is_empty() {
        return Err(invalid("displayName is required"));
    }
    if name.chars().count() > MAX_GROUP_NAME
        || name.chars().any(char::is_control)
        || name.trim() != name
    {
        return Err(invalid(format!(
            "group displayName {name:?}: use 1-{MAX_GROUP_NAME} characters, no control \
             characters, no spaces at either end"
        )));
    }
    Ok(name)
}

/// The e-mail address kept from an `emails` value (an array, or one object): the primary
/// one, else the work one, else the first.
pub fn pick_email(v: &Value) -> Result<Option<String>, ScimError> {
    let items: Vec<&Value> = match v {
        Value::Null => return Ok(None),
        Value::Array(a) => a.iter().collect(),
        o @ Value::Object(_) => vec![o],
        _ => return Err(invalid("emails must be a list of objects")),
    };
    for i in &items {
        if !i.is_object() {
            return Err(invalid("emails must be a list of objects"));
        }
    }
    let primary =
        |i: &&&Value| get(i, "primary").is_some_and(|p| boolean("primary", p) == Ok(true));
    let work = |i: &&&Value| {
        get(i, "type")
            .and_then(Value::as_str)
            .is_some_and(|t| t.eq_ignore_ascii_case("work"))
    };
    let chosen = items
        .iter()
        .find(primary)
        .or_else(|| items.iter().find(work))
        .or_else(|| items.first());
    match chosen {
        None => Ok(None),
        Some(i) => text("emails.value", get(i, "value").unwrap_or(&Value::Null)),
    }
}

/// The display name a body gives: `displayName`, else `name.formatted`, else given and family
/// names.
fn display_name(body: &Value) -> Result<Option<String>, ScimError> {
    if let Some(d) = get(body, "displayName")
        && let Some(d) = text("displayName", d)?
    {
        return Ok(Some(d));
    }
    let Some(name) = get(body, "name").filter(|n| n.is_object()) else {
        return Ok(None);
    };
    if let Some(f) = get(name, "formatted")
        && let Some(f) = text("name.formatted", f)?
    {
        return Ok(Some(f));
    }
    let part = |k: &str| -> Result<Option<String>, ScimError> {
        get(name, k).map_or(Ok(None), |v| text(&format!("name.{k}"), v))
    };
    let parts: Vec<String> = [part("givenName")?, part("familyName")?]
        .into_iter()
        .flatten()
        .collect();
    Ok((!parts.is_empty()).then(|| parts.join(" ")))
}

fn object(body: &Value) -> Result<(), ScimError> {
    if body.is_object() {
        Ok(())
    } else {
        Err(ScimError::bad(
            "invalidSyntax",
            "the body must be a JSON object",
        ))
    }
}

/// A user from a POST or PUT body. `active` when the body does not say: true for a new user,
/// the current state for a replacement (a client that leaves it out does not re-enable or
/// disable anyone). Read-only and unknown attributes are ignored.
pub fn user_from_body(body: &Value, active: bool) -> Result<UserAttrs, ScimError> {
    object(body)?;
    Ok(UserAttrs {
        user_name: user_name(get(body, "userName").unwrap_or(&Value::Null))?,
        external_id: get(body, "externalId").map_or(Ok(None), |v| text("externalId", v))?,
        display_name: display_name(body)?,
        email: get(body, "emails").map_or(Ok(None), pick_email)?,
        active: get(body, "active").map_or(Ok(active), |v| match v {
            Value::Null => Ok(active),
            v => boolean("active", v),
        })?,
    })
}

/// Member references from a `members` value: each an object with a `value` (a user's id).
pub fn members(v: &Value) -> Result<Vec<Member>, ScimError> {
    let items: Vec<&Value> = match v {
        Value::Null => vec![],
        Value::Array(a) => a.iter().collect(),
        o @ Value::Object(_) => vec![o],
        _ => return Err(invalid("members must be a list of {\"value\": USER_ID}")),
    };
    if items.len() > MAX_MEMBERS {
        return Err(invalid(format!(
            "at most {MAX_MEMBERS} members in one request"
        )));
    }
    let mut out: Vec<Member> = Vec::with_capacity(items.len());
    let mut seen = std::collections::HashSet::new();
    for i in items {
        let Some(value) = get(i, "value").and_then(Value::as_str) else {
            return Err(invalid("each member needs a \"value\": a user's id"));
        };
        if let Some(t) = get(i, "type").and_then(Value::as_str)
            && !t.eq_ignore_ascii_case("user")
        {
            return Err(invalid(format!(
                "member {value:?} is a {t}: only users can be members"
            )));
        }
        if seen.insert(value) {
            out.push(Member {
                value: value.to_string(),
                display: None,
            });
        }
    }
    Ok(out)
}

/// A group from a POST or PUT body (members are replaced by the body's; none if it has none).
pub fn group_from_body(body: &Value) -> Result<GroupAttrs, ScimError> {
    object(body)?;
    Ok(GroupAttrs {
        display_name: group_name(get(body, "displayName").unwrap_or(&Value::Null))?,
        external_id: get(body, "externalId").map_or(Ok(None), |v| text("externalId", v))?,
        members: get(body, "members").map_or(Ok(vec![]), members)?,
    })
}

/// What a list (or search) asks for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListParams {
    pub filter: Option<String>,
    /// 1-based.
    pub start_index: usize,
    pub count: usize,
    /// Attribute names, lower case, URN left off.
    pub attributes: Vec<String>,
    pub excluded: Vec<String>,
}

fn attr_names(list: &str) -> Vec<String> {
    list.split(',')
        .map(|a| {
            let a = a.trim();
            let a = if a.len() > 4 && a.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("urn:")) {
                a.rsplit(':').next().unwrap_or(a)
            } else {
                a
            };
            a.split('.').next().unwrap_or(a).to_ascii_lowercase()
        })
        .filter(|a| !a.is_empty())
        .collect()
}

fn number(field: &str, text: &str) -> Result<i64, ScimError> {
    text.trim()
        .parse::<i64>()
        .map_err(|_| invalid(format!("{field} must be an integer")))
}

impl ListParams {
    /// From query parameters (names in any case). `startIndex` below 1 is 1; `count` below 0
    /// is 0 and above [`MAX_RESULTS`] is [`MAX_RESULTS`], as RFC 7644 §3.4.2.4 says.
    pub fn from_query(query: &[(String, String)]) -> Result<ListParams, ScimError> {
        let mut p = ListParams {
            start_index: 1,
            count: MAX_RESULTS,
            ..Default::default()
        };
        for (k, v) in query {
            match k.to_ascii_lowercase().as_str() {
                "filter" => p.filter = Some(v.clone()),
                "startindex" => p.start_index = number("startIndex", v)?.max(1) as usize,
                "count" => p.count = (number("count", v)?.max(0) as usize).min(MAX_RESULTS),
                "attributes" => p.attributes = attr_names(v),
                "excludedattributes" => p.excluded = attr_names(v),
                _ => {}
            }
        }
        Ok(p)
    }

    /// From a `.search` body (RFC 7644 §3.4.3).
    pub fn from_search(body: &Value) -> Result<ListParams, ScimError> {
        object(body)?;
        let mut query = Vec::new();
        let list = |v: &Value| -> Result<String, ScimError> {
            match v {
                Value::String(s) => Ok(s.clone()),
                Value::Array(a) => Ok(a
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(",")),
                _ => Err(invalid("attributes must be a list of names")),
            }
        };
        for (k, v) in body.as_object().into_iter().flatten() {
            let text = match k.to_ascii_lowercase().as_str() {
                "filter" => v
                    .as_str()
                    .ok_or_else(|| invalid("filter must be a string"))?
                    .to_string(),
                "startindex" | "count" => match v {
                    Value::Number(n) => n.to_string(),
                    _ => return Err(invalid(format!("{k} must be an integer"))),
                },
                "attributes" | "excludedattributes" => list(v)?,
                _ => continue,
            };
            query.push((k.clone(), text));
        }
        ListParams::from_query(&query)
    }

    /// The page of `items` asked for.
    pub fn page<T>(&self, items: Vec<T>) -> Vec<T> {
        items
            .into_iter()
            .skip(self.start_index - 1)
            .take(self.count)
            .collect()
    }

    /// Whether the attribute (lower case) is to be returned.
    pub fn wants(&self, attr: &str) -> bool {
        (self.attributes.is_empty() || self.attributes.iter().any(|a| a == attr))
            && !self.excluded.iter().any(|a| a == attr)
    }

    /// Leaves out of `resource` what `attributes` / `excludedAttributes` leave out (`id` and
    /// `schemas` are always returned).
    pub fn project(&self, resource: &mut Value) {
        if self.attributes.is_empty() && self.excluded.is_empty() {
            return;
        }
        if let Some(m) = resource.as_object_mut() {
            m.retain(|k, _| {
                let k = k.to_ascii_lowercase();
                k == "id" || k == "schemas" || self.wants(&k)
            });
        }
    }
}

/// A ListResponse of one page of `total` matches.
pub fn list_response(resources: Vec<Value>, total: usize, start_index: usize) -> Value {
    json!({
        "schemas": [LIST_RESPONSE],
        "totalResults": total,
        "itemsPerPage": resources.len(),
        "startIndex": start_index,
        "Resources": resources,
    })
}

/// `/ServiceProviderConfig`: what this service provider supports.
pub fn service_provider_config(base: &str) -> Value {
    json!({
        "schemas": [SP_CONFIG],
        "patch": {"supported": true},
        "bulk": {"supported": false, "maxOperations": 0, "maxPayloadSize": 0},
        "filter": {"supported": true, "maxResults": MAX_RESULTS},
        "changePassword": {"supported": false},
        "sort": {"supported": false},
        "etag": {"supported": false},
        "authenticationSchemes": [{
            "type": "oauthbearertoken",
            "name": "OAuth Bearer Token",
            "description": "A SCIM token (SKS1.…) made with `sekisho-broker admin scim-token \
                create`, sent as Authorization: Bearer",
            "primary": true,
        }],
        "meta": {"resourceType": "ServiceProviderConfig",
            "location": format!("{base}/ServiceProviderConfig")},
    })
}

/// The resource types: User and Group.
pub fn resource_types(base: &str) -> Vec<Value> {
    [
        ("User", "/Users", USER_SCHEMA, "User Account"),
        ("Group", "/Groups", GROUP_SCHEMA, "Group"),
    ]
    .into_iter()
    .map(|(name, endpoint, schema, description)| {
        json!({
            "schemas": [RESOURCE_TYPE],
            "id": name,
            "name": name,
            "endpoint": endpoint,
            "description": description,
            "schema": schema,
            "meta": {"resourceType": "ResourceType",
                "location": format!("{base}/ResourceTypes/{name}")},
        })
    })
    .collect()
}

#[allow(clippy::too_many_arguments)]
fn attribute(
    name: &str,
    kind: &str,
    multi: bool,
    required: bool,
    case_exact: bool,
    mutability: &str,
    uniqueness: &str,
    description: &str,
) -> Value {
    json!({
        "name": name, "type": kind, "multiValued": multi, "description": description,
        "required": required, "caseExact": case_exact, "mutability": mutability,
        "returned": "default", "uniqueness": uniqueness,
    })
}

fn with_subs(mut a: Value, subs: Vec<Value>) -> Value {
    a["subAttributes"] = Value::Array(subs);
    a
}

fn reference(kind: &str, mutability: &str) -> Vec<Value> {
    let mut value = attribute(
        "value",
        "string",
        false,
        false,
        true,
        mutability,
        "none",
        "The id of the resource.",
    );
    value["required"] = json!(mutability != "readOnly");
    let mut r = attribute(
        "$ref",
        "reference",
        false,
        false,
        true,
        mutability,
        "none",
        "Its URI.",
    );
    r["referenceTypes"] = json!([kind]);
    vec![
        value,
        r,
        attribute(
            "display",
            "string",
            false,
            false,
            false,
            "readOnly",
            "none",
            "Its name.",
        ),
        attribute(
            "type",
            "string",
            false,
            false,
            false,
            mutability,
            "none",
            "Its kind.",
        ),
    ]
}

/// A boolean attribute (no `caseExact`).
fn boolean_attribute(name: &str, description: &str) -> Value {
    let mut a = attribute(
        name,
        "boolean",
        false,
        false,
        false,
        "readWrite",
        "none",
        description,
    );
    if let Some(m) = a.as_object_mut() {
        m.remove("caseExact");
    }
    a
}

/// The schemas: User (the attributes Sekisho keeps) and Group.
pub fn schemas(base: &str) -> Vec<Value> {
    let user_name = attribute(
        "userName",
        "string",
        false,
        true,
        false,
        "readWrite",
        "server",
        "The user's name in Sekisho (policy rules, devices): 1-128 letters, digits, '-', '_', \
         '.', '@', '+'; unique without regard to case.",
    );
    let name = with_subs(
        attribute(
            "name",
            "complex",
            false,
            false,
            false,
            "readWrite",
            "none",
            "Only the formatted name is kept (as displayName).",
        ),
        vec![attribute(
            "formatted",
            "string",
            false,
            false,
            false,
            "readWrite",
            "none",
            "The full name.",
        )],
    );
    let display_name = attribute(
        "displayName",
        "string",
        false,
        false,
        false,
        "readWrite",
        "none",
        "The name shown to people.",
    );
    let emails = with_subs(
        attribute(
            "emails",
            "complex",
            true,
            false,
            false,
            "readWrite",
            "none",
            "One address is kept: the primary one, else the work one.",
        ),
        vec![
            attribute(
                "value",
                "string",
                false,
                false,
                false,
                "readWrite",
                "none",
                "The address.",
            ),
            attribute(
                "type",
                "string",
                false,
                false,
                false,
                "readWrite",
                "none",
                "Always work.",
            ),
            boolean_attribute("primary", "Always true."),
        ],
    );
    let active = boolean_attribute(
        "active",
        "False: the user is disabled and every flow of theirs is cut.",
    );
    let groups = with_subs(
        attribute(
            "groups",
            "complex",
            true,
            false,
            false,
            "readOnly",
            "none",
            "The groups the user is in (change them through the groups).",
        ),
        reference("Group", "readOnly"),
    );
    let user = json!({
        "schemas": [SCHEMA],
        "id": USER_SCHEMA,
        "name": "User",
        "description": "User Account",
        "attributes": [user_name, name, display_name, emails, active, groups],
        "meta": {"resourceType": "Schema", "location": format!("{base}/Schemas/{USER_SCHEMA}")},
    });
    let group_name = attribute(
        "displayName",
        "string",
        false,
        true,
        false,
        "readWrite",
        "server",
        "The group's name in Sekisho (policy rules): 1-128 characters; unique without regard \
         to case.",
    );
    let members = with_subs(
        attribute(
            "members",
            "complex",
            true,
            false,
            false,
            "readWrite",
            "none",
            "Users of the group (by their id).",
        ),
        reference("User", "immutable"),
    );
    let group = json!({
        "schemas": [SCHEMA],
        "id": GROUP_SCHEMA,
        "name": "Group",
        "description": "Group",
        "attributes": [group_name, members],
        "meta": {"resourceType": "Schema", "location": format!("{base}/Schemas/{GROUP_SCHEMA}")},
    });
    vec![user, group]
}

#[cfg(test)]
mod tests {
    #[test]
    fn attribute_lists_with_any_characters() {
        assert_eq!(attr_names("abcé"), vec!["abcé".to_lowercase()]);
        assert_eq!(
            attr_names("urn:ietf:params:scim:schemas:core:2.0:User:userName"),
            vec!["username".to_string()]
        );
    }

    use super::*;

    fn record() -> ScimUserRecord {
        ScimUserRecord {
            id: "u-1".into(),
            name: "alice@example.com".into(),
            external_id: Some("E1".into()),
            display_name: Some("Alice".into()),
            email: Some("alice@example.com".into()),
            disabled: false,
            created_at: 1_700_000_000,
            updated_at: 0,
            groups: vec![("g-1".into(), "engineering".into())],
        }
    }

    #[test]
    fn a_user_renders_as_scim_json() {
        let v = user_json(&record(), "https://b:8443/scim/v2");
        assert_eq!(v["schemas"][0], USER_SCHEMA);
        assert_eq!(v["userName"], "alice@example.com");
        assert_eq!(v["emails"][0]["value"], "alice@example.com");
        assert_eq!(v["groups"][0]["$ref"], "https://b:8443/scim/v2/Groups/g-1");
        assert_eq!(v["meta"]["location"], "https://b:8443/scim/v2/Users/u-1");
        assert_eq!(v["meta"]["created"], "2023-11-14T22:13:20Z");
        // Never modified: lastModified is the creation.
        assert_eq!(v["meta"]["lastModified"], v["meta"]["created"]);
        assert_eq!(v["active"], true);
    }

    #[test]
    fn bodies_become_attributes() {
        let u = user_from_body(
            &json!({"schemas": [USER_SCHEMA], "USERNAME": "bob@example.com",
                "name": {"givenName": "Bob", "familyName": "Builder"},
                "emails": [{"value": "home@x.org", "type": "home"},
                           {"value": "bob@example.com", "type": "work"}],
                "active": "False", "id": "ignored", "groups": [{"value": "ignored"}],
                "title": "ignored"}),
            true,
        )
        .unwrap();
        assert_eq!(u.user_name, "bob@example.com");
        assert_eq!(u.display_name.as_deref(), Some("Bob Builder"));
        assert_eq!(u.email.as_deref(), Some("bob@example.com"));
        assert!(!u.active);
        // PUT without active keeps the current state.
        let u = user_from_body(&json!({"userName": "x"}), false).unwrap();
        assert!(!u.active);
        let table: &[(Value, &str)] = &[
            (json!({}), "invalidValue"),
            (json!({"userName": ""}), "invalidValue"),
            (json!({"userName": 5}), "invalidValue"),
            (json!({"userName": "has space"}), "invalidValue"),
            (json!({"userName": "a#b"}), "invalidValue"),
            (json!({"userName": "x".repeat(129)}), "invalidValue"),
            (json!({"userName": "x", "active": "yes"}), "invalidValue"),
            (json!({"userName": "x", "emails": "a@b"}), "invalidValue"),
            (
                json!({"userName": "x", "displayName": "a\u{7}b"}),
                "invalidValue",
            ),
            (
                json!({"userName": "x", "externalId": "e".repeat(300)}),
                "invalidValue",
            ),
            (json!(["userName"]), "invalidSyntax"),
        ];
        for (body, kind) in table {
            let e = user_from_body(body, true).expect_err(&body.to_string());
            assert_eq!(e.scim_type, Some(*kind), "{body}");
            assert_eq!(e.status, 400);
        }
    }

    #[test]
    fn groups_and_members() {
        let g = group_from_body(&json!({"displayName": "Sales EMEA",
            "members": [{"value": "u-1"}, {"value": "u-1"}, {"value": "u-2", "type": "User"}]}))
        .unwrap();
        assert_eq!(g.display_name, "Sales EMEA");
        assert_eq!(g.members.len(), 2);
        for bad in [
            json!({}),
            json!({"displayName": " padded"}),
            json!({"displayName": "x".repeat(129)}),
            json!({"displayName": "x", "members": [{"display": "no value"}]}),
            json!({"displayName": "x", "members": [{"value": "g-2", "type": "Group"}]}),
            json!({"displayName": "x", "members": "u-1"}),
        ] {
            assert!(group_from_body(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn paging_and_selection() {
        let q = |pairs: &[(&str, &str)]| {
            ListParams::from_query(
                &pairs
                    .iter()
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .collect::<Vec<_>>(),
            )
        };
        let p = q(&[("startIndex", "0"), ("count", "-5")]).unwrap();
        assert_eq!((p.start_index, p.count), (1, 0));
        let p = q(&[("STARTINDEX", "3"), ("count", "2")]).unwrap();
        assert_eq!(p.page((1..=10).collect()), vec![3, 4]);
        let p = q(&[("startIndex", "11"), ("count", "5")]).unwrap();
        assert_eq!(p.page((1..=10).collect::<Vec<i32>>()), Vec::<i32>::new());
        let p = q(&[("count", "100000")]).unwrap();
        assert_eq!(p.count, MAX_RESULTS);
        assert!(q(&[("count", "ten")]).is_err());
        assert!(q(&[("startIndex", "1.5")]).is_err());
        let p = q(&[(
            "excludedAttributes",
            "members,urn:ietf:params:scim:schemas:core:2.0:Group:meta",
        )])
        .unwrap();
        let mut g =
            json!({"id": "g", "schemas": [], "displayName": "x", "members": [], "meta": {}});
        p.project(&mut g);
        assert_eq!(g, json!({"id": "g", "schemas": [], "displayName": "x"}));
        let p = q(&[("attributes", "userName,name.givenName")]).unwrap();
        let mut u = json!({"id": "u", "schemas": [], "userName": "x", "name": {}, "active": true});
        p.project(&mut u);
        assert_eq!(
            u,
            json!({"id": "u", "schemas": [], "userName": "x", "name": {}})
        );
        let s = ListParams::from_search(&json!({"schemas": [SEARCH_REQUEST],
            "filter": "userName eq \"x\"", "startIndex": 2, "count": 1,
            "excludedAttributes": ["groups"]}))
        .unwrap();
        assert_eq!(s.filter.as_deref(), Some("userName eq \"x\""));
        assert_eq!((s.start_index, s.count), (2, 1));
        assert_eq!(s.excluded, vec!["groups"]);
        assert!(ListParams::from_search(&json!({"count": "1"})).is_err());
    }

    #[test]
    fn discovery_documents() {
        let c = service_provider_config("https://b/scim/v2");
        assert_eq!(c["patch"]["supported"], true);
        assert_eq!(c["bulk"]["supported"], false);
        assert_eq!(c["filter"]["maxResults"], MAX_RESULTS);
        assert_eq!(c["authenticationSchemes"][0]["type"], "oauthbearertoken");
        assert_eq!(resource_types("b").len(), 2);
        let s = schemas("b");
        assert_eq!(s[0]["id"], USER_SCHEMA);
        assert_eq!(s[1]["attributes"][1]["name"], "members");
    }
}
