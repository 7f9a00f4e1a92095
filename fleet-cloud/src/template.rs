//! Provisioning templates as data, in the shape of AWS IoT fleet
//! provisioning templates: `Parameters`, `Mappings`, and `Resources` with
//! a thing (`AWS::IoT::Thing`: its name, attributes and groups), the
//! certificate (`AWS::IoT::Certificate`) and a policy (`AWS::IoT::Policy`,
//! accepted and not applied: fleet's broker policy confines every device
//! to its own topics). Values are literals or the intrinsic functions AWS
//! documents for templates: `Ref` (a parameter, or the pseudo parameters
//! `AWS::IoT::Certificate::Id` and `AWS::IoT::Certificate::CommonName`),
//! `Fn::Join`, `Fn::Select`, `Fn::Split`, `Fn::Sub` and `Fn::FindInMap`.
//!
//! A template is checked when it is read ([`TemplateBody::parse`]): an
//! unknown resource type, property or function, or a `Ref` to a parameter
//! it does not declare, is refused with the path of the fault. It is
//! rendered for each registration ([`TemplateBody::render`]) with the
//! device's parameters (and a declared parameter's `Default`).
//!
//! ```
//! use fleet_cloud::template::{Certificate, TemplateBody};
//! use std::collections::BTreeMap;
//!
//! let body = TemplateBody::parse(&serde_json::json!({
//!     "Parameters": {
//!         "SerialNumber": {"Type": "String"},
//!         "Site": {"Type": "String", "Default": "north"}
//!     },
//!     "Resources": {
//!         "thing": {
//!             "Type": "AWS::IoT::Thing",
//!             "Properties": {
//!                 "ThingName": {"Fn::Join": ["", ["pump-", {"Ref": "SerialNumber"}]]},
//!                 "AttributePayload": {"serial": {"Ref": "SerialNumber"}, "site": {"Ref": "Site"}},
//!                 "ThingGroups": ["pumps", {"Fn::Sub": "site-${Site}"}]
//!             }
//!         },
//!         "certificate": {
//!             "Type": "AWS::IoT::Certificate",
//!             "Properties": {"CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "ACTIVE"}
//!         }
//!     }
//! }))?;
//! let parameters = BTreeMap::from([("SerialNumber".to_string(), "0042".to_string())]);
//! let r = body.render(&parameters, &Certificate { id: "ab12".into(), common_name: "x".into() })?;
//! assert_eq!(r.thing_name, "pump-0042");
//! assert_eq!(r.attributes["site"], "north");
//! assert_eq!(r.groups, ["pumps", "site-north"]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;
use std::fmt;

use serde_json::Value;

/// A template that does not hold, or a registration it cannot render:
/// where (a path in the template, `Resources.thing.Properties.ThingName`)
/// and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError {
    /// Where in the template.
    pub path: String,
    /// What is wrong.
    pub message: String,
    /// The fault is the registration's values', not the template's.
    depends_on_values: bool,
}

impl TemplateError {
    pub(crate) fn new(path: &str, message: impl Into<String>) -> Self {
        Self {
            path: path.to_string(),
            message: message.into(),
            depends_on_values: false,
        }
    }

    fn of_values(path: &str, message: impl Into<String>) -> Self {
        Self {
            depends_on_values: true,
            ..Self::new(path, message)
        }
    }
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for TemplateError {}

/// The certificate a registration binds, for the pseudo parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    /// Its id (`AWS::IoT::Certificate::Id`).
    pub id: String,
    /// Its subject's common name (`AWS::IoT::Certificate::CommonName`).
    pub common_name: String,
}

/// What a template gives a registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The thing's name.
    pub thing_name: String,
    /// Its attributes.
    pub attributes: BTreeMap<String, String>,
    /// The static groups it joins.
    pub groups: Vec<String>,
}

/// A declared parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Parameter {
    default: Option<String>,
}

/// A provisioning template's body, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateBody {
    parameters: BTreeMap<String, Parameter>,
    mappings: BTreeMap<String, Value>,
    thing_name: Value,
    attributes: BTreeMap<String, Value>,
    groups: Vec<Value>,
    /// The document as given (for the API to show).
    source: Value,
}

const THING: &str = "AWS::IoT::Thing";
const CERTIFICATE: &str = "AWS::IoT::Certificate";
const POLICY: &str = "AWS::IoT::Policy";
const CERTIFICATE_ID: &str = "AWS::IoT::Certificate::Id";
const COMMON_NAME: &str = "AWS::IoT::Certificate::CommonName";

/// A string or list a value evaluates to.
#[derive(Debug, Clone, PartialEq)]
enum Evaluated {
    Text(String),
    List(Vec<String>),
}

impl TemplateBody {
    /// Reads and checks an AWS-shaped template document.
    pub fn parse(document: &Value) -> Result<Self, TemplateError> {
        let top = document
            .as_object()
            .ok_or_else(|| TemplateError::new("", "a template is a JSON object"))?;
        for key in top.keys() {
            if !matches!(
                key.as_str(),
                "Parameters"
                    | "Resources"
                    | "Mappings"
                    | "AWSTemplateFormatVersion"
                    | "Description"
            ) {
                return Err(TemplateError::new(key, "not a template section"));
            }
        }
        let mut parameters = BTreeMap::new();
        if let Some(p) = top.get("Parameters") {
            let p = p
                .as_object()
                .ok_or_else(|| TemplateError::new("Parameters", "must be an object"))?;
            for (name, decl) in p {
                let path = format!("Parameters.{name}");
                let decl = decl
                    .as_object()
                    .ok_or_else(|| TemplateError::new(&path, "must be an object"))?;
                match decl.get("Type").and_then(Value::as_str) {
                    Some("String") => {}
                    Some(other) => {
                        return Err(TemplateError::new(
                            &path,
                            format!("type {other:?}: only String parameters"),
                        ));
                    }
                    None => return Err(TemplateError::new(&path, "has no Type")),
                }
                let default = match decl.get("Default") {
                    None => None,
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(_) => return Err(TemplateError::new(&path, "Default must be a string")),
                };
                parameters.insert(name.clone(), Parameter { default });
            }
        }
        let mappings = match top.get("Mappings") {
            None => BTreeMap::new(),
            Some(Value::Object(m)) => m.clone().into_iter().collect(),
            Some(_) => return Err(TemplateError::new("Mappings", "must be an object")),
        };
        let resources = top
            .get("Resources")
            .and_then(Value::as_object)
            .ok_or_else(|| TemplateError::new("Resources", "an object of resources is required"))?;
        let mut thing = None;
        for (name, resource) in resources {
            let path = format!("Resources.{name}");
            let kind = resource
                .get("Type")
                .and_then(Value::as_str)
                .ok_or_else(|| TemplateError::new(&path, "has no Type"))?;
            let properties = match resource.get("Properties") {
                Some(Value::Object(p)) => p.clone(),
                None => serde_json::Map::new(),
                Some(_) => return Err(TemplateError::new(&path, "Properties must be an object")),
            };
            for key in resource.as_object().into_iter().flat_map(|o| o.keys()) {
                if !matches!(key.as_str(), "Type" | "Properties" | "OverrideSettings") {
                    return Err(TemplateError::new(
                        &format!("{path}.{key}"),
                        "not supported",
                    ));
                }
            }
            match kind {
                THING => {
                    if thing.is_some() {
                        return Err(TemplateError::new(&path, "a template has one thing"));
                    }
                    thing = Some((path, properties));
                }
                CERTIFICATE => {
                    for (key, value) in &properties {
                        let at = format!("{path}.Properties.{key}");
                        match key.as_str() {
                            "CertificateId" => {
                                if value != &serde_json::json!({ "Ref": CERTIFICATE_ID }) {
                                    return Err(TemplateError::new(
                                        &at,
                                        format!(
                                            "must be {{\"Ref\": \"{CERTIFICATE_ID}\"}}: the certificate is the device's"
                                        ),
                                    ));
                                }
                            }
                            "Status" => {
                                if value != "ACTIVE" {
                                    return Err(TemplateError::new(
                                        &at,
                                        "only ACTIVE: a device registers to connect",
                                    ));
                                }
                            }
                            _ => return Err(TemplateError::new(&at, "not supported")),
                        }
                    }
                }
                // Accepted, not applied: fleet's broker policy confines
                // each device to its own topics.
                POLICY => {}
                other => {
                    return Err(TemplateError::new(
                        &path,
                        format!(
                            "resource type {other:?} is not supported ({THING}, {CERTIFICATE}, {POLICY})"
                        ),
                    ));
                }
            }
        }
        let (thing_path, properties) =
            thing.ok_or_else(|| TemplateError::new("Resources", format!("no {THING}")))?;
        let mut body = Self {
            parameters,
            mappings,
            thing_name: Value::Null,
            attributes: BTreeMap::new(),
            groups: Vec::new(),
            source: document.clone(),
        };
        for (key, value) in properties {
            let at = format!("{thing_path}.Properties.{key}");
            match key.as_str() {
                "ThingName" => {
                    body.check(&at, &value)?;
                    body.thing_name = value;
                }
                "AttributePayload" => {
                    let map = value
                        .as_object()
                        .ok_or_else(|| TemplateError::new(&at, "must be an object"))?;
                    for (name, v) in map {
                        body.check(&format!("{at}.{name}"), v)?;
                        body.attributes.insert(name.clone(), v.clone());
                    }
                }
                "ThingGroups" => {
                    let list = value
                        .as_array()
                        .ok_or_else(|| TemplateError::new(&at, "must be a list"))?;
                    for (i, v) in list.iter().enumerate() {
                        body.check(&format!("{at}[{i}]"), v)?;
                        body.groups.push(v.clone());
                    }
                }
                // Fleet has no thing types or billing groups.
                "ThingTypeName" | "BillingGroup" => {}
                _ => return Err(TemplateError::new(&at, "not supported")),
            }
        }
        if body.thing_name.is_null() {
            return Err(TemplateError::new(
                &format!("{thing_path}.Properties.ThingName"),
                "is required",
            ));
        }
        Ok(body)
    }

    /// The document as it was given.
    pub fn document(&self) -> &Value {
        &self.source
    }

    /// The parameters a registration must give (declared without a
    /// `Default`).
    pub fn required_parameters(&self) -> Vec<String> {
        self.parameters
            .iter()
            .filter(|(_, p)| p.default.is_none())
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Checks that `value` is a literal or a supported function whose
    /// `Ref`s name declared parameters.
    fn check(&self, path: &str, value: &Value) -> Result<(), TemplateError> {
        let certificate = Certificate {
            id: String::new(),
            common_name: String::new(),
        };
        // Evaluated with every parameter present, so that only the
        // template's own faults show; what depends on the values (an index
        // past a list's end, a key not in a mapping) can only fail later.
        let all: BTreeMap<String, String> = self
            .parameters
            .keys()
            .map(|k| (k.clone(), "x".to_string()))
            .collect();
        match self.eval(path, value, &all, &certificate) {
            Err(e) if !e.depends_on_values => Err(e),
            _ => Ok(()),
        }
    }

    /// The registration `parameters` make: the thing's name, attributes
    /// and groups. A declared parameter the device left out takes its
    /// `Default`; one without a default is an error.
    pub fn render(
        &self,
        parameters: &BTreeMap<String, String>,
        certificate: &Certificate,
    ) -> Result<Rendered, TemplateError> {
        let mut values = BTreeMap::new();
        for (name, p) in &self.parameters {
            match parameters.get(name).or(p.default.as_ref()) {
                Some(v) => {
                    values.insert(name.clone(), v.clone());
                }
                None => {
                    return Err(TemplateError::new(
                        &format!("Parameters.{name}"),
                        "is required and was not given",
                    ));
                }
            }
        }
        let text = |path: &str, v: &Value| match self.eval(path, v, &values, certificate)? {
            Evaluated::Text(s) => Ok(s),
            Evaluated::List(_) => Err(TemplateError::new(path, "is a list, not a string")),
        };
        let thing_name = text("ThingName", &self.thing_name)?;
        let mut attributes = BTreeMap::new();
        for (k, v) in &self.attributes {
            attributes.insert(k.clone(), text(&format!("AttributePayload.{k}"), v)?);
        }
        let mut groups = Vec::new();
        for (i, v) in self.groups.iter().enumerate() {
            match self.eval(&format!("ThingGroups[{i}]"), v, &values, certificate)? {
                Evaluated::Text(s) => groups.push(s),
                Evaluated::List(l) => groups.extend(l),
            }
        }
        Ok(Rendered {
            thing_name,
            attributes,
            groups,
        })
    }

    fn eval(
        &self,
        path: &str,
        value: &Value,
        params: &BTreeMap<String, String>,
        certificate: &Certificate,
    ) -> Result<Evaluated, TemplateError> {
        let text = |path: &str, v: &Value| match self.eval(path, v, params, certificate)? {
            Evaluated::Text(s) => Ok(s),
            Evaluated::List(_) => Err(TemplateError::new(path, "a list where a string is needed")),
        };
        match value {
            Value::String(s) => Ok(Evaluated::Text(s.clone())),
            Value::Number(n) => Ok(Evaluated::Text(n.to_string())),
            Value::Bool(b) => Ok(Evaluated::Text(b.to_string())),
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, v)| text(&format!("{path}[{i}]"), v))
                .collect::<Result<_, _>>()
                .map(Evaluated::List),
            Value::Object(o) if o.len() == 1 => {
                let (function, args) = o
                    .iter()
                    .next()
                    .ok_or_else(|| TemplateError::new(path, "an empty object is not a value"))?;
                let at = format!("{path}.{function}");
                match function.as_str() {
                    "Ref" => {
                        let name = args
                            .as_str()
                            .ok_or_else(|| TemplateError::new(&at, "names a parameter"))?;
                        match name {
                            CERTIFICATE_ID => Ok(Evaluated::Text(certificate.id.clone())),
                            COMMON_NAME => Ok(Evaluated::Text(certificate.common_name.clone())),
                            _ if !self.parameters.contains_key(name) => Err(TemplateError::new(
                                &at,
                                format!("{name:?} is not a declared parameter"),
                            )),
                            _ => params
                                .get(name)
                                .cloned()
                                .map(Evaluated::Text)
                                .ok_or_else(|| {
                                    TemplateError::new(&at, format!("no value for {name}"))
                                }),
                        }
                    }
                    "Fn::Join" => {
                        let [sep, list] = two(&at, args)?;
                        let sep = sep
                            .as_str()
                            .ok_or_else(|| TemplateError::new(&at, "the separator is a string"))?;
                        match self.eval(&format!("{at}[1]"), list, params, certificate)? {
                            Evaluated::List(l) => Ok(Evaluated::Text(l.join(sep))),
                            Evaluated::Text(_) => Err(TemplateError::new(&at, "joins a list")),
                        }
                    }
                    "Fn::Split" => {
                        let [sep, s] = two(&at, args)?;
                        let sep = sep
                            .as_str()
                            .filter(|s| !s.is_empty())
                            .ok_or_else(|| TemplateError::new(&at, "the separator is a string"))?;
                        let s = text(&format!("{at}[1]"), s)?;
                        Ok(Evaluated::List(s.split(sep).map(String::from).collect()))
                    }
                    "Fn::Select" => {
                        let [index, list] = two(&at, args)?;
                        let index = match index {
                            Value::Number(n) => n.as_u64(),
                            Value::String(s) => s.parse().ok(),
                            _ => None,
                        }
                        .ok_or_else(|| TemplateError::new(&at, "the index is a number"))?;
                        match self.eval(&format!("{at}[1]"), list, params, certificate)? {
                            Evaluated::List(l) => usize::try_from(index)
                                .ok()
                                .and_then(|i| l.get(i).cloned())
                                .map(Evaluated::Text)
                                .ok_or_else(|| {
                                    TemplateError::of_values(
                                        &at,
                                        format!("index {index} is past the list's end"),
                                    )
                                }),
                            Evaluated::Text(_) => {
                                Err(TemplateError::new(&at, "selects from a list"))
                            }
                        }
                    }
                    "Fn::Sub" => {
                        let template = args
                            .as_str()
                            .ok_or_else(|| TemplateError::new(&at, "substitutes into a string"))?;
                        let mut out = String::new();
                        let mut rest = template;
                        while let Some(start) = rest.find("${") {
                            out.push_str(&rest[..start]);
                            let after = &rest[start + 2..];
                            let end = after
                                .find('}')
                                .ok_or_else(|| TemplateError::new(&at, "an unclosed ${"))?;
                            let name = &after[..end];
                            let v = text(&at, &serde_json::json!({ "Ref": name }))?;
                            out.push_str(&v);
                            rest = &after[end + 1..];
                        }
                        out.push_str(rest);
                        Ok(Evaluated::Text(out))
                    }
                    "Fn::FindInMap" => {
                        let items = args
                            .as_array()
                            .filter(|a| a.len() == 3)
                            .ok_or_else(|| TemplateError::new(&at, "takes [map, key, key]"))?;
                        let map = text(&format!("{at}[0]"), &items[0])?;
                        let first = text(&format!("{at}[1]"), &items[1])?;
                        let second = text(&format!("{at}[2]"), &items[2])?;
                        let table = self.mappings.get(&map).ok_or_else(|| {
                            TemplateError::new(&at, format!("no mapping {map:?}"))
                        })?;
                        match table.get(&first).and_then(|t| t.get(&second)) {
                            Some(Value::String(s)) => Ok(Evaluated::Text(s.clone())),
                            Some(Value::Array(l)) => Ok(Evaluated::List(
                                l.iter()
                                    .filter_map(|v| v.as_str().map(String::from))
                                    .collect(),
                            )),
                            _ => Err(TemplateError::of_values(
                                &at,
                                format!("no value {map}.{first}.{second}"),
                            )),
                        }
                    }
                    other => Err(TemplateError::new(
                        &at,
                        format!("{other:?} is not a supported function"),
                    )),
                }
            }
            _ => Err(TemplateError::new(
                path,
                "not a value: a string, a list or one function",
            )),
        }
    }
}

/// A function's two arguments.
fn two<'a>(path: &str, args: &'a Value) -> Result<[&'a Value; 2], TemplateError> {
    match args.as_array().map(Vec::as_slice) {
        Some([a, b]) => Ok([a, b]),
        _ => Err(TemplateError::new(path, "takes two arguments")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cert() -> Certificate {
        Certificate {
            id: "c0ffee".into(),
            common_name: "device-1".into(),
        }
    }

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The template of AWS IoT's fleet provisioning documentation, as
    /// published (with its policy resource).
    fn aws_example() -> Value {
        json!({
            "Parameters": {
                "ThingName": {"Type": "String"},
                "SerialNumber": {"Type": "String"},
                "DeviceLocation": {"Type": "String"}
            },
            "Mappings": {
                "LocationTable": {
                    "Seattle": {"LocationUrl": "https://example.aws"}
                }
            },
            "Resources": {
                "thing": {
                    "Type": "AWS::IoT::Thing",
                    "Properties": {
                        "AttributePayload": {"version": "v1", "serialNumber": "serialNumber"},
                        "ThingName": {"Ref": "ThingName"},
                        "ThingGroups": ["v1-lightbulbs", "WA"],
                        "BillingGroup": "LightBulbBillingGroup"
                    },
                    "OverrideSettings": {
                        "AttributePayload": "MERGE",
                        "ThingTypeName": "REPLACE",
                        "ThingGroups": "DO_NOTHING"
                    }
                },
                "certificate": {
                    "Type": "AWS::IoT::Certificate",
                    "Properties": {
                        "CertificateId": {"Ref": "AWS::IoT::Certificate::Id"},
                        "Status": "ACTIVE"
                    }
                },
                "policy": {
                    "Type": "AWS::IoT::Policy",
                    "Properties": {
                        "PolicyDocument": "{ \"Version\": \"2012-10-17\", \"Statement\": [{ \"Effect\": \"Allow\", \"Action\":[\"iot:Publish\"], \"Resource\": [\"arn:aws:iot:us-east-1:123456789012:topic/foo/bar\"] }] }"
                    }
                }
            }
        })
    }

    #[test]
    fn awss_documented_template_reads_and_renders() {
        let body = TemplateBody::parse(&aws_example()).unwrap();
        let r = body
            .render(
                &params(&[
                    ("ThingName", "bulb-1"),
                    ("SerialNumber", "123"),
                    ("DeviceLocation", "Seattle"),
                ]),
                &cert(),
            )
            .unwrap();
        assert_eq!(r.thing_name, "bulb-1");
        assert_eq!(r.attributes["version"], "v1");
        assert_eq!(r.groups, ["v1-lightbulbs", "WA"]);
        assert_eq!(
            body.required_parameters(),
            ["DeviceLocation", "SerialNumber", "ThingName"]
        );
    }

    #[test]
    fn functions_evaluate_as_aws_documents_them() {
        let body = TemplateBody::parse(&json!({
            "Parameters": {
                "Serial": {"Type": "String"},
                "Location": {"Type": "String", "Default": "Seattle"},
                "Tags": {"Type": "String", "Default": "a,b"}
            },
            "Mappings": {"Sites": {"Seattle": {"Group": "us-west"}}},
            "Resources": {"thing": {"Type": "AWS::IoT::Thing", "Properties": {
                "ThingName": {"Fn::Join": ["-", ["pump", {"Ref": "Serial"}]]},
                "AttributePayload": {
                    "cert": {"Ref": "AWS::IoT::Certificate::Id"},
                    "cn": {"Ref": "AWS::IoT::Certificate::CommonName"},
                    "first": {"Fn::Select": [0, {"Fn::Split": [",", {"Ref": "Tags"}]}]},
                    "label": {"Fn::Sub": "${Serial}@${Location}"}
                },
                "ThingGroups": [{"Fn::FindInMap": ["Sites", {"Ref": "Location"}, "Group"]}, {"Fn::Split": [",", {"Ref": "Tags"}]}]
            }}}
        }))
        .unwrap();
        let r = body.render(&params(&[("Serial", "7")]), &cert()).unwrap();
        assert_eq!(r.thing_name, "pump-7");
        assert_eq!(r.attributes["cert"], "c0ffee");
        assert_eq!(r.attributes["cn"], "device-1");
        assert_eq!(r.attributes["first"], "a");
        assert_eq!(r.attributes["label"], "7@Seattle");
        assert_eq!(r.groups, ["us-west", "a", "b"]);
        // A parameter without a default must be given.
        let e = body.render(&params(&[]), &cert()).unwrap_err();
        assert_eq!(e.path, "Parameters.Serial");
        // A value out of a mapping's reach is an error, not a guess.
        let e = body
            .render(&params(&[("Serial", "7"), ("Location", "Oslo")]), &cert())
            .unwrap_err();
        assert!(e.message.contains("Sites.Oslo.Group"), "{e}");
    }

    #[test]
    fn faults_are_refused_with_their_path() {
        let thing = |props: Value| {
            json!({"Parameters": {"S": {"Type": "String"}},
                   "Resources": {"thing": {"Type": "AWS::IoT::Thing", "Properties": props}}})
        };
        for (doc, path) in [
            (
                thing(json!({"ThingName": {"Ref": "Nope"}})),
                "Resources.thing.Properties.ThingName.Ref",
            ),
            (
                thing(json!({"ThingName": {"Fn::Base64": "x"}})),
                "Resources.thing.Properties.ThingName.Fn::Base64",
            ),
            (
                thing(json!({"ThingName": "x", "Colour": "red"})),
                "Resources.thing.Properties.Colour",
            ),
            (
                thing(json!({"AttributePayload": {}})),
                "Resources.thing.Properties.ThingName",
            ),
            (
                thing(json!({"ThingName": "x", "ThingGroups": "g"})),
                "Resources.thing.Properties.ThingGroups",
            ),
            (
                json!({"Resources": {"r": {"Type": "AWS::S3::Bucket"}}}),
                "Resources.r",
            ),
            (json!({"Resources": {}}), "Resources"),
            (
                json!({"Parameters": {"S": {"Type": "Number"}}, "Resources": {}}),
                "Parameters.S",
            ),
            (json!({"Resoures": {}}), "Resoures"),
            (
                json!({"Resources": {"thing": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": "x"}},
                                  "c": {"Type": "AWS::IoT::Certificate", "Properties": {"Status": "INACTIVE"}}}}),
                "Resources.c.Properties.Status",
            ),
        ] {
            let e = TemplateBody::parse(&doc).unwrap_err();
            assert_eq!(e.path, path, "{doc}: {e}");
        }
    }
}
