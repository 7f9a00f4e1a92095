//! The API's handlers, each declared once for both the router and the
//! OpenAPI document.

use fleet_core::topic::{
    Role as TopicRole, ShadowOp, ShadowTopic, ShadowTopicKind, Topic, TopicPrefix,
};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::types::*;
use super::{Api, ApiError, ApiJson, ErrorBody, ErrorCode};
use crate::{CampaignSpec, CommandFailure, JobSpec, RolloutAction, Scope, TargetSelection};
use fleet_core::ThingName;
use fleet_core::jobs::{RolloutPolicy, TimeoutConfig};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "fleet management API",
        description = "Things, groups, certificates, provisioning, shadows, jobs, releases, campaigns, commands and tokens. Every endpoint but /health needs a bearer token.",
        version = "1"
    ),
    modifiers(&BearerAuth),
    security(("token" = []))
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The routes that need a token.
pub(super) fn routes() -> OpenApiRouter<Api> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(openapi_document))
        .routes(routes!(list_things, create_thing))
        .routes(routes!(statistics))
        .routes(routes!(get_thing, delete_thing))
        .routes(routes!(set_attributes))
        .routes(routes!(set_enabled))
        .routes(routes!(list_certificates))
        .routes(routes!(revoke_certificate))
        .routes(routes!(list_groups, create_group))
        .routes(routes!(group_members))
        .routes(routes!(add_member))
        .routes(routes!(get_shadow, update_shadow, delete_shadow))
        .routes(routes!(
            get_named_shadow,
            update_named_shadow,
            delete_named_shadow
        ))
        .routes(routes!(list_jobs, create_job))
        .routes(routes!(get_job))
        .routes(routes!(job_executions))
        .routes(routes!(cancel_job))
        .routes(routes!(list_releases, upload_release))
        .routes(routes!(list_campaigns, start_campaign))
        .routes(routes!(campaign_status))
        .routes(routes!(control_campaign))
        .routes(routes!(send_command))
        .routes(routes!(list_templates))
        .routes(routes!(get_template, put_template, delete_template))
        .routes(routes!(create_claim))
        .routes(routes!(list_tokens, create_token))
        .routes(routes!(revoke_token))
        .routes(routes!(audit_log))
}

/// The routes open to anyone.
pub(super) fn open_routes() -> OpenApiRouter<Api> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(livez))
        .routes(routes!(readyz))
}

fn thing_name(name: &str) -> Result<ThingName<'_>, ApiError> {
    ThingName::new(name).map_err(|e| ApiError::invalid(format!("thing name {name:?}: {e}")))
}

/// Runs CPU-heavy work (key generation) on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
}

async fn publish_all(api: &Api, messages: impl IntoIterator<Item = (String, Vec<u8>)>) {
    for (topic, payload) in messages {
        if let Err(e) = api.publisher.publish(&topic, payload).await {
            tracing::warn!("API: publish {topic}: {e}");
        }
    }
}

// ---- health and the document

/// Liveness (the same as `/livez`; kept for older probes).
#[utoipa::path(get, path = "/health", security(()), responses((status = 200, body = Health)))]
async fn health() -> axum::Json<Health> {
    axum::Json(Health {
        status: "ok".into(),
        checks: None,
    })
}

/// Liveness: the process runs and answers.
#[utoipa::path(get, path = "/livez", security(()), responses((status = 200, body = Health)))]
async fn livez() -> axum::Json<Health> {
    axum::Json(Health {
        status: "ok".into(),
        checks: None,
    })
}

/// Readiness: the store answers and the broker connection is up (with
/// several instances, whether this one holds the lease). 503 with the
/// reason of each failed check when not ready.
#[utoipa::path(get, path = "/readyz", security(()), responses(
    (status = 200, body = Health, description = "Ready: every check passed"),
    (status = 503, body = Health, description = "Not ready: `checks` says why"),
))]
async fn readyz(State(api): State<Api>) -> Response {
    let Some(readiness) = &api.readiness else {
        return axum::Json(Health {
            status: "ready".into(),
            checks: None,
        })
        .into_response();
    };
    let report = readiness.check().await;
    let (code, status) = if report.ready {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    };
    (
        code,
        axum::Json(Health {
            status: status.into(),
            checks: Some(report.checks),
        }),
    )
        .into_response()
}

/// The OpenAPI document, wrapped for the extension.
#[derive(Clone)]
pub(super) struct Document(pub(super) Arc<utoipa::openapi::OpenApi>);

/// This API's OpenAPI 3.1 document.
#[utoipa::path(get, path = "/openapi.json", responses((status = 200, description = "The OpenAPI document", body = Object)))]
async fn openapi_document(Extension(doc): Extension<Document>) -> Response {
    axum::Json((*doc.0).clone()).into_response()
}

// ---- things

/// A page of a list.
#[derive(Debug, Deserialize, IntoParams)]
pub(crate) struct Page {
    /// The last item of the previous page (the `next` it gave).
    after: Option<String>,
    /// Items per page (default 100, at most 1,000).
    limit: Option<usize>,
}

impl Page {
    fn limit(&self) -> Result<usize, ApiError> {
        match self.limit {
            None => Ok(100),
            Some(n @ 1..=1000) => Ok(n),
            Some(n) => Err(ApiError::invalid(format!("limit {n}: must be 1 to 1000"))),
        }
    }
}

impl From<crate::Thing> for ThingView {
    fn from(t: crate::Thing) -> Self {
        Self {
            name: t.name,
            attributes: t.attributes,
            enabled: t.enabled,
            connectivity: None,
        }
    }
}

/// A page of things, found by a query or not.
#[derive(Debug, Deserialize, IntoParams)]
pub(crate) struct ThingSearch {
    /// A query in AWS IoT fleet indexing's syntax
    /// (`thingName:pump-* AND shadow.reported.temp > 80`); absent: every
    /// thing.
    q: Option<String>,
    /// The last item of the previous page (the `next` it gave).
    after: Option<String>,
    /// Items per page (default 100, at most 1,000).
    limit: Option<usize>,
}

impl From<crate::InventoryError> for ApiError {
    fn from(e: crate::InventoryError) -> Self {
        match e {
            crate::InventoryError::Store(_) => Self::internal(e.to_string()),
            _ => Self::invalid(e.to_string()),
        }
    }
}

fn inventory(api: &Api) -> Result<&crate::Inventory, ApiError> {
    api.inventory
        .as_ref()
        .ok_or_else(|| ApiError::invalid("this server keeps no fleet index"))
}

/// A thing with its connectivity.
async fn thing_view(api: &Api, t: crate::Thing) -> Result<ThingView, ApiError> {
    let mut view = ThingView::from(t);
    if let Some(inventory) = &api.inventory {
        view.connectivity = inventory
            .connectivity(&view.name)
            .await?
            .map(ConnectivityView::from);
    }
    Ok(view)
}

/// Lists things by name: every one, or those a query finds (`q`).
#[utoipa::path(get, path = "/v1/things", params(ThingSearch), responses((status = 200, body = ThingList), (status = 400, body = ErrorBody)))]
async fn list_things(
    State(api): State<Api>,
    Query(search): Query<ThingSearch>,
) -> Result<axum::Json<ThingList>, ApiError> {
    let page = Page {
        after: search.after,
        limit: search.limit,
    };
    let limit = page.limit()?;
    let things = match &search.q {
        None => api.registry.things(page.after.as_deref(), limit).await?,
        Some(q) => {
            let names = inventory(&api)?
                .search(q, page.after.as_deref().unwrap_or(""), limit)
                .await?;
            let mut things = Vec::with_capacity(names.len());
            for name in names {
                match api.registry.thing(&name).await {
                    Ok(t) => things.push(t),
                    // Deleted since: not listed.
                    Err(crate::RegistryError::NotFound(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            things
        }
    };
    let next = (things.len() == limit)
        .then(|| things.last().map(|t| t.name.clone()))
        .flatten();
    let mut items = Vec::with_capacity(things.len());
    for t in things {
        items.push(thing_view(&api, t).await?);
    }
    Ok(axum::Json(ThingList { items, next }))
}

/// What to count.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StatisticsQuery {
    /// The things counted: a query (`*`: every thing).
    q: String,
    /// Also count the things per value of this field
    /// (`shadow.reported.firmware`).
    group_by: Option<String>,
    /// Also the min, max and mean of this numeric field.
    field: Option<String>,
    /// Values of `groupBy` listed at most (default 100, at most 1,000).
    limit: Option<usize>,
}

/// Counts the things a query finds, per value of a field, and the
/// statistics of a numeric field over them.
#[utoipa::path(get, path = "/v1/statistics", params(StatisticsQuery), responses((status = 200, body = Statistics), (status = 400, body = ErrorBody)))]
async fn statistics(
    State(api): State<Api>,
    Query(s): Query<StatisticsQuery>,
) -> Result<axum::Json<Statistics>, ApiError> {
    let inventory = inventory(&api)?;
    let limit = Page {
        after: None,
        limit: s.limit,
    }
    .limit()?;
    let count = inventory.count(&s.q).await?;
    let groups = match &s.group_by {
        None => None,
        Some(field) => Some(
            inventory
                .count_by(&s.q, field, limit)
                .await?
                .into_iter()
                .map(|(value, count)| Bucket { value, count })
                .collect(),
        ),
    };
    let field = match &s.field {
        None => None,
        Some(field) => {
            let st = inventory.stats(&s.q, field).await?;
            Some(FieldStatistics {
                count: st.count,
                min: st.min,
                max: st.max,
                avg: st.avg,
            })
        }
    };
    Ok(axum::Json(Statistics {
        count,
        groups,
        field,
    }))
}

/// Registers a thing.
#[utoipa::path(post, path = "/v1/things", request_body = CreateThing, responses((status = 201, body = ThingView), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn create_thing(
    State(api): State<Api>,
    ApiJson(body): ApiJson<CreateThing>,
) -> Result<(StatusCode, axum::Json<ThingView>), ApiError> {
    let thing = api
        .registry
        .create_thing(&body.name, body.attributes)
        .await?;
    if let Some(hook) = &api.on_standing_changed {
        hook(&thing.name, true).await;
    }
    Ok((StatusCode::CREATED, axum::Json(thing.into())))
}

/// A thing.
#[utoipa::path(get, path = "/v1/things/{thing}", params(("thing" = String, Path, description = "The thing's name")), responses((status = 200, body = ThingView), (status = 404, body = ErrorBody)))]
async fn get_thing(
    State(api): State<Api>,
    Path(thing): Path<String>,
) -> Result<axum::Json<ThingView>, ApiError> {
    let t = api.registry.thing(&thing).await?;
    Ok(axum::Json(thing_view(&api, t).await?))
}

/// Deletes a thing (its certificates and group memberships with it).
#[utoipa::path(delete, path = "/v1/things/{thing}", params(("thing" = String, Path, description = "The thing's name")), responses((status = 204), (status = 404, body = ErrorBody)))]
async fn delete_thing(
    State(api): State<Api>,
    Path(thing): Path<String>,
) -> Result<Response, ApiError> {
    let before = thing_before(&api, &thing).await;
    api.registry.delete_thing(&thing).await?;
    if let Some(hook) = &api.on_standing_changed {
        hook(&thing, false).await;
    }
    Ok(with_before(before, StatusCode::NO_CONTENT))
}

/// Replaces a thing's attributes.
#[utoipa::path(put, path = "/v1/things/{thing}/attributes", params(("thing" = String, Path, description = "The thing's name")), request_body = SetAttributes, responses((status = 200, body = ThingView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn set_attributes(
    State(api): State<Api>,
    Path(thing): Path<String>,
    ApiJson(body): ApiJson<SetAttributes>,
) -> Result<Response, ApiError> {
    let before = thing_before(&api, &thing).await;
    api.registry
        .set_attributes(&thing, &body.attributes)
        .await?;
    let t = api.registry.thing(&thing).await?;
    Ok(with_before(before, axum::Json(ThingView::from(t))))
}

/// Enables or disables a thing (a disabled thing may not connect).
#[utoipa::path(put, path = "/v1/things/{thing}/enabled", params(("thing" = String, Path, description = "The thing's name")), request_body = SetEnabled, responses((status = 200, body = ThingView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn set_enabled(
    State(api): State<Api>,
    Path(thing): Path<String>,
    ApiJson(body): ApiJson<SetEnabled>,
) -> Result<Response, ApiError> {
    let before = thing_before(&api, &thing).await;
    api.registry.set_enabled(&thing, body.enabled).await?;
    if let Some(hook) = &api.on_standing_changed {
        hook(&thing, body.enabled).await;
    }
    let t = api.registry.thing(&thing).await?;
    Ok(with_before(before, axum::Json(ThingView::from(t))))
}

// ---- certificates

/// A thing's certificates.
#[utoipa::path(get, path = "/v1/things/{thing}/certificates", params(("thing" = String, Path, description = "The thing's name")), responses((status = 200, body = Vec<CertificateView>), (status = 404, body = ErrorBody)))]
async fn list_certificates(
    State(api): State<Api>,
    Path(thing): Path<String>,
) -> Result<axum::Json<Vec<CertificateView>>, ApiError> {
    api.registry.thing(&thing).await?;
    let certs = api.registry.certificates(&thing).await?;
    Ok(axum::Json(
        certs
            .into_iter()
            .map(|c| CertificateView {
                id: c.id,
                thing: c.thing,
                status: match c.status {
                    crate::CertificateStatus::Active => "active".into(),
                    _ => "revoked".into(),
                },
                pem: c.pem,
            })
            .collect(),
    ))
}

/// Revokes a certificate: the broker refuses it from now on (admin).
#[utoipa::path(post, path = "/v1/certificates/{id}/revoke", params(("id" = String, Path, description = "The certificate id")), responses((status = 204), (status = 404, body = ErrorBody)))]
async fn revoke_certificate(
    State(api): State<Api>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    api.registry.revoke_certificate(&id).await?;
    if let Some(hook) = &api.on_revoke {
        hook(&id).await;
    }
    Ok(StatusCode::NO_CONTENT)
}

// ---- groups

/// Creates a group (static, or dynamic with a query).
#[utoipa::path(post, path = "/v1/groups", request_body = CreateGroup, responses((status = 201, body = GroupMembers), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn create_group(
    State(api): State<Api>,
    ApiJson(body): ApiJson<CreateGroup>,
) -> Result<(StatusCode, axum::Json<GroupMembers>), ApiError> {
    api.registry
        .create_group(&body.name, body.query.clone().map(Into::into).as_ref())
        .await?;
    let members = GroupMembers {
        members: api.registry.group_members(&body.name).await?,
        group: body.name,
    };
    Ok((StatusCode::CREATED, axum::Json(members)))
}

/// Lists groups by name, with each dynamic group's query.
#[utoipa::path(get, path = "/v1/groups", params(Page), responses((status = 200, body = GroupList), (status = 400, body = ErrorBody)))]
async fn list_groups(
    State(api): State<Api>,
    Query(page): Query<Page>,
) -> Result<axum::Json<GroupList>, ApiError> {
    let limit = page.limit()?;
    let items = api.registry.groups(page.after.as_deref(), limit).await?;
    let next = (items.len() == limit)
        .then(|| items.last().map(|(name, _)| name.clone()))
        .flatten();
    Ok(axum::Json(GroupList {
        items: items
            .into_iter()
            .map(|(name, query)| GroupView {
                name,
                query: query.map(Into::into),
            })
            .collect(),
        next,
    }))
}

/// A group's members.
#[utoipa::path(get, path = "/v1/groups/{group}/members", params(("group" = String, Path, description = "The group")), responses((status = 200, body = GroupMembers), (status = 404, body = ErrorBody)))]
async fn group_members(
    State(api): State<Api>,
    Path(group): Path<String>,
) -> Result<axum::Json<GroupMembers>, ApiError> {
    let members = api.registry.group_members(&group).await?;
    let members = GroupMembers { group, members };
    Ok(axum::Json(members))
}

/// Adds a thing to a static group.
#[utoipa::path(put, path = "/v1/groups/{group}/members/{thing}", params(("group" = String, Path, description = "The group"), ("thing" = String, Path, description = "The thing")), responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn add_member(
    State(api): State<Api>,
    Path((group, thing)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    api.registry.add_to_group(&group, &thing).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- shadows

/// Runs a shadow request as a device's would run (same rules, same
/// documents; what it tells devices is published) and answers with the
/// accepted document or the rejection.
async fn shadow_request(
    api: &Api,
    thing: &str,
    shadow: Option<&str>,
    op: ShadowOp,
    payload: Vec<u8>,
) -> Result<Response, ApiError> {
    thing_name(thing)?;
    let thing = fleet_core::ThingName::new(thing)
        .map_err(|e| ApiError::invalid(format!("thing name {thing:?}: {e}")))?;
    let shadow = shadow
        .map(|name| {
            fleet_core::ShadowName::new(name)
                .map_err(|e| ApiError::invalid(format!("shadow name {name:?}: {e}")))
        })
        .transpose()?;
    let prefix = api.shadows.prefix();
    let prefix = TopicPrefix::new(prefix).map_err(|e| ApiError::internal(e.to_string()))?;
    let request = Topic::Shadow(ShadowTopic {
        thing: thing.clone(),
        shadow: shadow.clone(),
        kind: ShadowTopicKind::Op(op, TopicRole::Request),
    });
    let reply = |role| request.reply(role).map(|t| t.to_string_under(&prefix));
    let (accepted, rejected) = (reply(TopicRole::Accepted), reply(TopicRole::Rejected));
    let request = crate::service::Request::new(
        request,
        &payload,
        crate::service::Caller::Operator,
        api.jobs.now(),
    );
    // What a change replaces, for the audit log.
    let before = if op == ShadowOp::Get {
        None
    } else {
        api.shadows
            .get(&thing, shadow.as_ref())
            .await
            .ok()
            .and_then(|s| {
                let state = s.state()?;
                Some(serde_json::json!({
                    "version": s.version(),
                    "desired": state.desired(),
                    "reported": state.reported(),
                }))
            })
    };
    let out = api
        .shadows
        .handle(&request)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let mut answer = None;
    let mut publish = Vec::new();
    for o in out {
        if Some(&o.topic) == accepted.as_ref() {
            answer = Some(Ok(o.payload.clone()));
        } else if Some(&o.topic) == rejected.as_ref() {
            answer = Some(Err(o.payload));
            continue;
        }
        // A GET's answer is for the asker only.
        if op != ShadowOp::Get {
            publish.push((o.topic, o.payload));
        }
    }
    publish_all(api, publish).await;
    match answer {
        Some(Ok(doc)) => {
            let doc: Value =
                serde_json::from_slice(&doc).map_err(|e| ApiError::internal(e.to_string()))?;
            Ok(with_before(before, axum::Json(doc)))
        }
        Some(Err(rejection)) => {
            let r: Value = serde_json::from_slice(&rejection).unwrap_or(Value::Null);
            let message = r
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("rejected")
                .to_string();
            Err(match r.get("code").and_then(Value::as_u64) {
                Some(404) => ApiError::not_found(message),
                Some(409) => ApiError::conflict(message),
                Some(400 | 413) => ApiError::invalid(message),
                _ => ApiError::internal(message),
            })
        }
        None => Err(ApiError::internal("the shadow service gave no answer")),
    }
}

fn body_bytes(body: &Value) -> Result<Vec<u8>, ApiError> {
    if !body.is_object() {
        return Err(ApiError::invalid("the body must be a JSON object"));
    }
    serde_json::to_vec(body).map_err(|e| ApiError::internal(e.to_string()))
}

/// A thing's classic shadow (the same document as `/get/accepted`).
#[utoipa::path(get, path = "/v1/things/{thing}/shadow", params(("thing" = String, Path, description = "The thing")), responses((status = 200, description = "The shadow document", body = Object), (status = 404, body = ErrorBody)))]
async fn get_shadow(
    State(api): State<Api>,
    Path(thing): Path<String>,
) -> Result<Response, ApiError> {
    shadow_request(&api, &thing, None, ShadowOp::Get, Vec::new()).await
}

/// Updates a thing's classic shadow: the device protocol's update document
/// (`{"state": {"desired": {...}}}`, optionally `version`); the answer is
/// `/update/accepted`'s document.
#[utoipa::path(post, path = "/v1/things/{thing}/shadow", params(("thing" = String, Path, description = "The thing")), request_body(content = Object, description = "An update document"), responses((status = 200, description = "The accepted update", body = Object), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn update_shadow(
    State(api): State<Api>,
    Path(thing): Path<String>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    shadow_request(&api, &thing, None, ShadowOp::Update, body_bytes(&body)?).await
}

/// Deletes a thing's classic shadow.
#[utoipa::path(delete, path = "/v1/things/{thing}/shadow", params(("thing" = String, Path, description = "The thing")), responses((status = 200, description = "The deletion", body = Object), (status = 404, body = ErrorBody)))]
async fn delete_shadow(
    State(api): State<Api>,
    Path(thing): Path<String>,
) -> Result<Response, ApiError> {
    shadow_request(&api, &thing, None, ShadowOp::Delete, Vec::new()).await
}

/// A thing's named shadow.
#[utoipa::path(get, path = "/v1/things/{thing}/shadows/{shadow}", params(("thing" = String, Path, description = "The thing"), ("shadow" = String, Path, description = "The shadow's name")), responses((status = 200, description = "The shadow document", body = Object), (status = 404, body = ErrorBody)))]
async fn get_named_shadow(
    State(api): State<Api>,
    Path((thing, shadow)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    shadow_request(&api, &thing, Some(&shadow), ShadowOp::Get, Vec::new()).await
}

/// Updates a thing's named shadow.
#[utoipa::path(post, path = "/v1/things/{thing}/shadows/{shadow}", params(("thing" = String, Path, description = "The thing"), ("shadow" = String, Path, description = "The shadow's name")), request_body(content = Object, description = "An update document"), responses((status = 200, description = "The accepted update", body = Object), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn update_named_shadow(
    State(api): State<Api>,
    Path((thing, shadow)): Path<(String, String)>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    shadow_request(
        &api,
        &thing,
        Some(&shadow),
        ShadowOp::Update,
        body_bytes(&body)?,
    )
    .await
}

/// Deletes a thing's named shadow.
#[utoipa::path(delete, path = "/v1/things/{thing}/shadows/{shadow}", params(("thing" = String, Path, description = "The thing"), ("shadow" = String, Path, description = "The shadow's name")), responses((status = 200, description = "The deletion", body = Object), (status = 404, body = ErrorBody)))]
async fn delete_named_shadow(
    State(api): State<Api>,
    Path((thing, shadow)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    shadow_request(&api, &thing, Some(&shadow), ShadowOp::Delete, Vec::new()).await
}

// ---- jobs

fn wire_name<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

async fn job_view(api: &Api, job_id: &str) -> Result<JobView, ApiError> {
    let record = api.jobs.job(job_id).await?;
    let snapshot = api.jobs.snapshot(job_id).await?;
    Ok(JobView {
        job_id: record.spec.job_id.clone(),
        state: wire_name(&record.state),
        document: record.spec.document.clone(),
        targets: record.targets.len(),
        executions: snapshot
            .executions
            .iter()
            .map(|(s, n)| (wire_name(s), *n))
            .collect(),
        not_released: snapshot.not_released,
        created_at: record.created_at,
    })
}

/// Lists jobs by id.
#[utoipa::path(get, path = "/v1/jobs", params(Page), responses((status = 200, body = JobList), (status = 400, body = ErrorBody)))]
async fn list_jobs(
    State(api): State<Api>,
    Query(page): Query<Page>,
) -> Result<axum::Json<JobList>, ApiError> {
    let limit = page.limit()?;
    let after = page.after.unwrap_or_default();
    let items: Vec<String> = api
        .jobs
        .job_ids()
        .await?
        .into_iter()
        .filter(|id| *id > after)
        .take(limit)
        .collect();
    let next = (items.len() == limit)
        .then(|| items.last().cloned())
        .flatten();
    Ok(axum::Json(JobList { items, next }))
}

/// Creates a job and notifies its targets.
#[utoipa::path(post, path = "/v1/jobs", request_body = CreateJob, responses((status = 201, body = JobView), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn create_job(
    State(api): State<Api>,
    ApiJson(body): ApiJson<CreateJob>,
) -> Result<(StatusCode, axum::Json<JobView>), ApiError> {
    let rollout = body
        .rollout
        .map(serde_json::from_value::<RolloutPolicy>)
        .transpose()
        .map_err(|e| ApiError::invalid(format!("rollout: {e}")))?;
    let spec = JobSpec {
        job_id: body.job_id.clone(),
        document: body.document,
        things: body.things,
        groups: body.groups,
        selection: if body.continuous {
            TargetSelection::Continuous
        } else {
            TargetSelection::Snapshot
        },
        timeouts: TimeoutConfig {
            in_progress_timeout_in_minutes: body.in_progress_timeout_minutes,
        },
        max_retries: body.max_retries,
        rollout,
    };
    let out = api
        .jobs
        .create_job(spec, &api.registry, api.jobs.now())
        .await?;
    publish_all(&api, out.into_iter().map(|m| (m.topic, m.payload))).await;
    Ok((
        StatusCode::CREATED,
        axum::Json(job_view(&api, &body.job_id).await?),
    ))
}

/// A job and its executions per status.
#[utoipa::path(get, path = "/v1/jobs/{job}", params(("job" = String, Path, description = "The job id")), responses((status = 200, body = JobView), (status = 404, body = ErrorBody)))]
async fn get_job(
    State(api): State<Api>,
    Path(job): Path<String>,
) -> Result<axum::Json<JobView>, ApiError> {
    Ok(axum::Json(job_view(&api, &job).await?))
}

/// A job's executions, by thing.
#[utoipa::path(get, path = "/v1/jobs/{job}/executions", params(("job" = String, Path, description = "The job id"), Page), responses((status = 200, body = ExecutionList), (status = 404, body = ErrorBody)))]
async fn job_executions(
    State(api): State<Api>,
    Path(job): Path<String>,
    Query(page): Query<Page>,
) -> Result<axum::Json<ExecutionList>, ApiError> {
    let limit = page.limit()?;
    let after = page.after.unwrap_or_default();
    let mut all = api.jobs.executions(&job).await?;
    all.sort_by(|a, b| a.thing.cmp(&b.thing));
    let items: Vec<ExecutionView> = all
        .into_iter()
        .filter(|e| e.thing > after)
        .take(limit)
        .map(|e| ExecutionView {
            status: wire_name(&e.execution.status),
            execution_number: e.execution.execution_number,
            version_number: e.execution.version_number,
            status_details: e.execution.status_details,
            queued_at: e.execution.queued_at,
            last_updated_at: e.execution.last_updated_at,
            thing: e.thing,
        })
        .collect();
    let next = (items.len() == limit)
        .then(|| items.last().map(|e| e.thing.clone()))
        .flatten();
    Ok(axum::Json(ExecutionList { items, next }))
}

/// Cancels a job: queued executions (and, with `force`, those in
/// progress) are canceled and their devices told.
#[utoipa::path(post, path = "/v1/jobs/{job}/cancel", params(("job" = String, Path, description = "The job id")), request_body = CancelJob, responses((status = 200, body = JobView), (status = 404, body = ErrorBody)))]
async fn cancel_job(
    State(api): State<Api>,
    Path(job): Path<String>,
    ApiJson(body): ApiJson<CancelJob>,
) -> Result<axum::Json<JobView>, ApiError> {
    let out = api
        .jobs
        .cancel_job(&job, body.force, api.jobs.now())
        .await?;
    publish_all(&api, out.into_iter().map(|m| (m.topic, m.payload))).await;
    Ok(axum::Json(job_view(&api, &job).await?))
}

// ---- releases and campaigns

/// Registers a release (the image is checked against the signed manifest).
#[utoipa::path(post, path = "/v1/releases", request_body = UploadRelease, responses((status = 201, body = ReleaseView), (status = 400, body = ErrorBody)))]
async fn upload_release(
    State(api): State<Api>,
    ApiJson(body): ApiJson<UploadRelease>,
) -> Result<(StatusCode, axum::Json<ReleaseView>), ApiError> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let envelope = b64
        .decode(&body.envelope)
        .map_err(|e| ApiError::invalid(format!("envelope: {e}")))?;
    let image = b64
        .decode(&body.image)
        .map_err(|e| ApiError::invalid(format!("image: {e}")))?;
    let size = image.len() as u64;
    api.jobs
        .register_release(&body.release_id, &envelope, image, &api.streams)
        .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(ReleaseView {
            release_id: body.release_id,
            size,
        }),
    ))
}

/// Lists registered releases by id, with their image's size.
#[utoipa::path(get, path = "/v1/releases", params(Page), responses((status = 200, body = ReleaseList), (status = 400, body = ErrorBody)))]
async fn list_releases(
    State(api): State<Api>,
    Query(page): Query<Page>,
) -> Result<axum::Json<ReleaseList>, ApiError> {
    let limit = page.limit()?;
    let streams = api
        .streams
        .list(page.after.as_deref().unwrap_or(""), limit)
        .await
        .map_err(|e| ApiError::internal(crate::broker::error_chain(&e)))?;
    let next = (streams.len() == limit)
        .then(|| streams.last().map(|s| s.id.clone()))
        .flatten();
    Ok(axum::Json(ReleaseList {
        items: streams
            .into_iter()
            .filter(|s| s.description == crate::campaigns::RELEASE_DESCRIPTION)
            .map(|s| ReleaseView {
                release_id: s.id,
                size: s.size,
            })
            .collect(),
        next,
    }))
}

async fn campaign_view(api: &Api, id: &str) -> Result<CampaignView, ApiError> {
    let s = api.jobs.campaign_status(id, &api.registry).await?;
    Ok(CampaignView {
        campaign_id: id.into(),
        done: s.is_final(),
        pending: s.pending,
        queued: s.queued,
        in_progress: s.in_progress,
        succeeded: s.succeeded,
        failed: s.failed,
        rolled_back: s.rolled_back,
        timed_out: s.timed_out,
        canceled: s.canceled,
        unverified_receipt: s.unverified_receipt,
        rollout: s.rollout.map(|r| format!("{r:?}")),
    })
}

/// Lists OTA campaigns by id (the jobs whose document is an OTA job).
#[utoipa::path(get, path = "/v1/campaigns", params(Page), responses((status = 200, body = CampaignList), (status = 400, body = ErrorBody)))]
async fn list_campaigns(
    State(api): State<Api>,
    Query(page): Query<Page>,
) -> Result<axum::Json<CampaignList>, ApiError> {
    let limit = page.limit()?;
    let after = page.after.unwrap_or_default();
    let mut items = Vec::new();
    for id in api.jobs.job_ids().await? {
        if id <= after {
            continue;
        }
        if items.len() == limit {
            break;
        }
        let record = match api.jobs.job(&id).await {
            Ok(r) => r,
            // Deleted meanwhile.
            Err(crate::JobsError::NotFound(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        if serde_json::from_value::<fleet_core::jobs::OtaJob>(record.spec.document.clone()).is_ok()
        {
            items.push(CampaignSummary {
                campaign_id: id,
                state: wire_name(&record.state),
                created_at: record.created_at,
            });
        }
    }
    let next = (items.len() == limit)
        .then(|| items.last().map(|c| c.campaign_id.clone()))
        .flatten();
    Ok(axum::Json(CampaignList { items, next }))
}

/// Starts a campaign of a registered release.
#[utoipa::path(post, path = "/v1/campaigns", request_body = StartCampaign, responses((status = 201, body = CampaignView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn start_campaign(
    State(api): State<Api>,
    ApiJson(body): ApiJson<StartCampaign>,
) -> Result<(StatusCode, axum::Json<CampaignView>), ApiError> {
    let policy: RolloutPolicy = serde_json::from_value(body.policy)
        .map_err(|e| ApiError::invalid(format!("policy: {e}")))?;
    let spec = CampaignSpec {
        campaign_id: body.campaign_id.clone(),
        release_id: body.release_id,
        things: body.things,
        groups: body.groups,
        policy,
        timeouts: TimeoutConfig {
            in_progress_timeout_in_minutes: body.in_progress_timeout_minutes,
        },
    };
    let out = api
        .jobs
        .start_campaign(spec, &api.streams, &api.registry, api.jobs.now())
        .await?;
    publish_all(&api, out.into_iter().map(|m| (m.topic, m.payload))).await;
    Ok((
        StatusCode::CREATED,
        axum::Json(campaign_view(&api, &body.campaign_id).await?),
    ))
}

/// Where a campaign stands.
#[utoipa::path(get, path = "/v1/campaigns/{campaign}", params(("campaign" = String, Path, description = "The campaign id")), responses((status = 200, body = CampaignView), (status = 404, body = ErrorBody)))]
async fn campaign_status(
    State(api): State<Api>,
    Path(campaign): Path<String>,
) -> Result<axum::Json<CampaignView>, ApiError> {
    Ok(axum::Json(campaign_view(&api, &campaign).await?))
}

/// Pauses, resumes, approves the next group of, or aborts a campaign.
#[utoipa::path(post, path = "/v1/campaigns/{campaign}/{action}", params(("campaign" = String, Path, description = "The campaign id"), ("action" = String, Path, description = "`pause`, `resume`, `approve` or `abort`")), responses((status = 200, body = CampaignView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn control_campaign(
    State(api): State<Api>,
    Path((campaign, action)): Path<(String, String)>,
) -> Result<axum::Json<CampaignView>, ApiError> {
    let action = match action.as_str() {
        "pause" => RolloutAction::Pause,
        "resume" => RolloutAction::Resume,
        "approve" => RolloutAction::Approve,
        "abort" => RolloutAction::Abort,
        other => {
            return Err(ApiError::invalid(format!(
                "action {other:?}: pause, resume, approve or abort"
            )));
        }
    };
    let out = api.jobs.control(&campaign, action, api.jobs.now()).await?;
    publish_all(&api, out.into_iter().map(|m| (m.topic, m.payload))).await;
    Ok(axum::Json(campaign_view(&api, &campaign).await?))
}

// ---- commands

/// Sends a command to a thing and waits for its answer.
#[utoipa::path(post, path = "/v1/things/{thing}/commands", params(("thing" = String, Path, description = "The thing")), request_body = SendCommand, responses((status = 200, body = CommandResult), (status = 400, body = ErrorBody), (status = 504, body = ErrorBody)))]
async fn send_command(
    State(api): State<Api>,
    Path(thing): Path<String>,
    ApiJson(body): ApiJson<SendCommand>,
) -> Result<axum::Json<CommandResult>, ApiError> {
    let name = thing_name(&thing)?;
    let timeout = match body.timeout_seconds {
        None => 30,
        Some(s @ 1..=300) => s,
        Some(s) => return Err(ApiError::invalid(format!("timeoutSeconds {s}: 1 to 300"))),
    };
    match api
        .commands
        .send(
            &name,
            &body.command,
            body.payload,
            Duration::from_secs(timeout),
        )
        .await
    {
        Ok(r) => Ok(axum::Json(CommandResult {
            execution_id: r.execution_id,
            status: wire_name(&r.status),
            payload: r.payload,
            status_reason: r.status_reason,
        })),
        Err(CommandFailure::TimedOut) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::Timeout,
            format!("{thing} did not answer in {timeout} s"),
        )),
        Err(CommandFailure::Invalid(e)) => Err(ApiError::invalid(format!("{e:?}"))),
        Err(e) => Err(ApiError::internal(e.to_string())),
    }
}

// ---- provisioning

/// A configured template as the API shows it.
fn configured_view(t: &crate::ProvisioningTemplate) -> TemplateView {
    TemplateView {
        name: t.name.clone(),
        thing_name_prefix: t.thing_name_prefix.clone(),
        name_parameter: t.name_parameter.clone(),
        required_parameters: t.required_parameters.clone(),
        attributes: t.attributes.clone(),
        groups: t.groups.clone(),
        document: t.body.as_ref().map(|b| b.document().clone()),
        pre_provisioning_hook: t.webhook.as_ref().map(|w| w.url.clone()),
        source: "configuration".into(),
        enabled: true,
        allow_replace: t.allow_replace,
        description: String::new(),
        version: None,
    }
}

/// A template created through the API as the API shows it.
fn stored_view(t: &crate::StoredTemplate) -> TemplateView {
    let required = crate::ProvisioningTemplate::from_stored(t)
        .map(|p| p.required_parameters)
        .unwrap_or_default();
    TemplateView {
        name: t.name.clone(),
        thing_name_prefix: String::new(),
        name_parameter: String::new(),
        required_parameters: required,
        attributes: Default::default(),
        groups: Vec::new(),
        document: Some(t.document.clone()),
        pre_provisioning_hook: t.hook.as_ref().map(|h| h.url.clone()),
        source: "api".into(),
        enabled: t.enabled,
        allow_replace: t.allow_replace,
        description: t.description.clone(),
        version: Some(t.version),
    }
}

/// The provisioning templates devices may provision by: those of the
/// configuration, then those created through the API, by name.
#[utoipa::path(get, path = "/v1/provisioning/templates", responses((status = 200, body = Vec<TemplateView>)))]
async fn list_templates(State(api): State<Api>) -> Result<axum::Json<Vec<TemplateView>>, ApiError> {
    let mut views: Vec<TemplateView> = api.templates.iter().map(configured_view).collect();
    views.extend(
        api.registry
            .stored_templates()
            .await?
            .iter()
            .filter(|t| !api.templates.iter().any(|c| c.name == t.name))
            .map(stored_view),
    );
    Ok(axum::Json(views))
}

/// A template name as AWS allows it: 1–36 of `[0-9A-Za-z_-]` (it is a
/// topic segment).
fn template_name(name: &str) -> Result<(), ApiError> {
    if (1..=36).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "template name {name:?}: 1 to 36 of A-Z a-z 0-9 _ -"
        )))
    }
}

/// One provisioning template.
#[utoipa::path(get, path = "/v1/provisioning/templates/{name}", params(("name" = String, Path, description = "The template")), responses((status = 200, body = TemplateView), (status = 404, body = ErrorBody)))]
async fn get_template(
    State(api): State<Api>,
    Path(name): Path<String>,
) -> Result<axum::Json<TemplateView>, ApiError> {
    if let Some(t) = api.templates.iter().find(|t| t.name == name) {
        return Ok(axum::Json(configured_view(t)));
    }
    match api.registry.stored_template(&name).await? {
        Some(t) => Ok(axum::Json(stored_view(&t))),
        None => Err(ApiError::not_found(format!("no template {name}"))),
    }
}

/// Creates or replaces a provisioning template (admin): an AWS IoT fleet
/// provisioning template document, checked before it is kept (a fault is
/// refused with its path and nothing is stored). Every instance sharing
/// the store serves it from the next registration on. Templates of the
/// configuration file cannot be replaced here (409).
#[utoipa::path(put, path = "/v1/provisioning/templates/{name}", params(("name" = String, Path, description = "The template")), request_body = PutTemplate, responses((status = 201, body = TemplateView), (status = 200, body = TemplateView), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn put_template(
    State(api): State<Api>,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<PutTemplate>,
) -> Result<Response, ApiError> {
    template_name(&name)?;
    if api.templates.iter().any(|t| t.name == name) {
        return Err(ApiError::conflict(format!(
            "template {name} is defined in fleet serve's configuration; change it there"
        )));
    }
    let document = match body.template_body {
        Value::String(s) => serde_json::from_str(&s)
            .map_err(|e| ApiError::invalid(format!("templateBody: not JSON: {e}")))?,
        v @ Value::Object(_) => v,
        _ => {
            return Err(ApiError::invalid(
                "templateBody: a JSON object, or a string holding one",
            ));
        }
    };
    let before = api.registry.stored_template(&name).await?;
    let now = super::now_ms();
    let stored = crate::StoredTemplate {
        name: name.clone(),
        description: body.description,
        enabled: body.enabled,
        document,
        allow_replace: body.allow_replace,
        hook: body.pre_provisioning_hook.map(|h| crate::StoredHook {
            url: h.url,
            ca_pem: h.ca_pem,
            timeout_ms: h.timeout_ms.unwrap_or(5_000),
        }),
        version: before.as_ref().map_or(1, |b| b.version + 1),
        created_ms: before.as_ref().map_or(now, |b| b.created_ms),
        updated_ms: now,
    };
    crate::ProvisioningTemplate::from_stored(&stored)
        .map_err(|e| ApiError::invalid(format!("template {name}: {e}")))?;
    api.registry.put_template(&stored).await?;
    let status = match before {
        Some(_) => StatusCode::OK,
        None => StatusCode::CREATED,
    };
    let before = before.and_then(|b| serde_json::to_value(stored_view(&b)).ok());
    Ok(with_before(
        before,
        (status, axum::Json(stored_view(&stored))),
    ))
}

/// Deletes a provisioning template created through the API (admin):
/// registrations by it are refused from then on; things it made stay.
#[utoipa::path(delete, path = "/v1/provisioning/templates/{name}", params(("name" = String, Path, description = "The template")), responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn delete_template(
    State(api): State<Api>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    if api.templates.iter().any(|t| t.name == name) {
        return Err(ApiError::conflict(format!(
            "template {name} is defined in fleet serve's configuration; remove it there"
        )));
    }
    let before = api
        .registry
        .stored_template(&name)
        .await?
        .and_then(|b| serde_json::to_value(stored_view(&b)).ok());
    api.registry.delete_template(&name).await?;
    Ok(with_before(before, StatusCode::NO_CONTENT))
}

/// Issues a certificate and key for a claim identity (admin).
#[utoipa::path(post, path = "/v1/provisioning/claims", request_body = CreateClaim, responses((status = 201, body = ClaimIdentity), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn create_claim(
    State(api): State<Api>,
    ApiJson(body): ApiJson<CreateClaim>,
) -> Result<(StatusCode, axum::Json<ClaimIdentity>), ApiError> {
    let Some(ca) = api.claim_ca.clone() else {
        return Err(ApiError::not_found(
            "this service does not issue claim identities",
        ));
    };
    if !api.claim_identities.contains(&body.name) {
        return Err(ApiError::invalid(format!(
            "{:?} is not a claim identity of this fleet ({})",
            body.name,
            api.claim_identities.join(", ")
        )));
    }
    let name = body.name.clone();
    let id = blocking(move || {
        ca.client_identity(&name)
            .map_err(|e| ApiError::internal(e.to_string()))
            .map(|id| (id, ca.ca_pem()))
    })
    .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(ClaimIdentity {
            name: body.name,
            cert_pem: id.0.cert_pem,
            key_pem: id.0.key_pem,
            ca_pem: id.1,
        }),
    ))
}

// ---- tokens

/// The API tokens (admin).
#[utoipa::path(get, path = "/v1/tokens", responses((status = 200, body = Vec<TokenView>)))]
async fn list_tokens(State(api): State<Api>) -> Result<axum::Json<Vec<TokenView>>, ApiError> {
    let tokens = api.registry.tokens().await?;
    Ok(axum::Json(
        tokens
            .into_iter()
            .map(|t| TokenView {
                id: t.id,
                name: t.name,
                scope: t.scope.as_str().into(),
                created_at: t.created_at,
                token: None,
            })
            .collect(),
    ))
}

/// Creates an API token; the answer holds the token, shown only now (admin).
#[utoipa::path(post, path = "/v1/tokens", request_body = CreateToken, responses((status = 201, body = TokenView), (status = 400, body = ErrorBody)))]
async fn create_token(
    State(api): State<Api>,
    ApiJson(body): ApiJson<CreateToken>,
) -> Result<(StatusCode, axum::Json<TokenView>), ApiError> {
    let scope = Scope::parse(&body.scope).ok_or_else(|| {
        ApiError::invalid(format!("scope {:?}: read, operator or admin", body.scope))
    })?;
    let (record, token) = api.registry.create_token(&body.name, scope).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(TokenView {
            id: record.id,
            name: record.name,
            scope: record.scope.as_str().into(),
            created_at: record.created_at,
            token: Some(token),
        }),
    ))
}

/// Revokes an API token (admin).
#[utoipa::path(delete, path = "/v1/tokens/{id}", params(("id" = String, Path, description = "The token id")), responses((status = 204), (status = 404, body = ErrorBody)))]
async fn revoke_token(
    State(api): State<Api>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    api.registry.revoke_token(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- audit

/// The audit log (admin): every change made through the API, and every
/// refused attempt at one, oldest first; `after` is an entry's id.
#[utoipa::path(get, path = "/v1/audit", params(Page), responses((status = 200, body = AuditList), (status = 400, body = ErrorBody)))]
async fn audit_log(
    State(api): State<Api>,
    Query(page): Query<Page>,
) -> Result<axum::Json<AuditList>, ApiError> {
    let limit = page.limit()?;
    let after = match page.after.as_deref() {
        None | Some("") => 0,
        Some(a) => a
            .parse::<u64>()
            .map_err(|_| ApiError::invalid(format!("after {a:?}: an audit entry's id")))?,
    };
    let items = api.registry.audit(after, limit).await?;
    let next = (items.len() == limit)
        .then(|| items.last().map(|e| e.id.to_string()))
        .flatten();
    Ok(axum::Json(AuditList {
        items: items
            .into_iter()
            .map(|e| AuditView {
                id: e.id,
                at_ms: e.at_ms,
                token_id: e.token_id,
                token_name: e.token_name,
                method: e.method,
                path: e.path,
                status: e.status,
                request: e.request,
                before: e.before,
            })
            .collect(),
        next,
    }))
}

/// A response that tells the audit log what its change replaced.
fn with_before<R: IntoResponse>(before: Option<Value>, r: R) -> Response {
    let mut response = r.into_response();
    if let Some(b) = before {
        response.extensions_mut().insert(super::AuditBefore(b));
    }
    response
}

/// A thing as the audit log shows what a change replaced.
async fn thing_before(api: &Api, thing: &str) -> Option<Value> {
    let t = api.registry.thing(thing).await.ok()?;
    serde_json::to_value(ThingView::from(t)).ok()
}
