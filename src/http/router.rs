//! The router: a pure function from method and path to a route. No I/O; fuzzed.

use hyper::Method;

use crate::metrics::RouteLabel;
use crate::protocol::is_identifier;

/// Every endpoint of SPEC §1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Push { app: String },
    Pull { app: String },
    AppStream { app: String },
    UnifiedStream,
    UnifiedSocket,
    AppSocket { app: String },
    Health,
    Metrics,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Routing {
    Found(Route),
    /// The path exists; `allow` lists the methods it answers (for the `Allow` header and CORS preflight).
    Preflight {
        allow: &'static str,
    },
    MethodNotAllowed {
        allow: &'static str,
    },
    /// The path has the shape of an endpoint but its app id is not an identifier.
    InvalidAppId,
    NotFound,
}

/// The methods one path answers, and the route each of them takes.
struct Resource {
    get: Option<Route>,
    post: Option<Route>,
}

/// Every endpoint as (method, path template); `openapi.yaml` documents exactly these (a test checks).
#[cfg(test)]
const ENDPOINTS: &[(&str, &str)] = &[
    ("POST", "/sync/{appId}"),
    ("GET", "/sync/{appId}/pull"),
    ("GET", "/sync/{appId}/stream"),
    ("GET", "/sync/stream"),
    ("GET", "/ws"),
    ("GET", "/ws/{appId}"),
    ("GET", "/health"),
    ("GET", "/metrics"),
];

/// A short, bounded name for metrics and logs.
pub(crate) fn label(routing: &Routing) -> RouteLabel {
    match routing {
        Routing::Found(Route::Push { .. }) => RouteLabel::Push,
        Routing::Found(Route::Pull { .. }) => RouteLabel::Pull,
        Routing::Found(Route::AppStream { .. }) => RouteLabel::Stream,
        Routing::Found(Route::UnifiedStream) => RouteLabel::UnifiedStream,
        Routing::Found(Route::UnifiedSocket) => RouteLabel::Ws,
        Routing::Found(Route::AppSocket { .. }) => RouteLabel::WsApp,
        Routing::Found(Route::Health) => RouteLabel::Health,
        Routing::Found(Route::Metrics) => RouteLabel::Metrics,
        Routing::Preflight { .. } => RouteLabel::Preflight,
        Routing::NotFound | Routing::InvalidAppId | Routing::MethodNotAllowed { .. } => {
            RouteLabel::Other
        }
    }
}

pub fn route(method: &Method, path: &str) -> Routing {
    let resource = match resolve(path) {
        Ok(Some(resource)) => resource,
        Ok(None) => return Routing::NotFound,
        Err(()) => return Routing::InvalidAppId,
    };
    let allow = match (&resource.get, &resource.post) {
        (Some(_), Some(_)) => "GET, POST, OPTIONS",
        (Some(_), None) => "GET, OPTIONS",
        _ => "POST, OPTIONS",
    };
    let found = match *method {
        Method::GET => resource.get,
        Method::POST => resource.post,
        Method::OPTIONS => return Routing::Preflight { allow },
        _ => None,
    };
    found
        .map(Routing::Found)
        .unwrap_or(Routing::MethodNotAllowed { allow })
}

fn resolve(path: &str) -> Result<Option<Resource>, ()> {
    let Some(rest) = path.strip_prefix('/') else {
        return Ok(None);
    };
    let segments: Vec<&str> = rest.split('/').collect();
    if segments.iter().any(|s| s.is_empty()) {
        return Ok(None);
    }
    let app = |name: &str| {
        if is_identifier(name) {
            Ok(name.to_owned())
        } else {
            Err(())
        }
    };
    let get = |route| {
        Ok(Some(Resource {
            get: Some(route),
            post: None,
        }))
    };
    match segments.as_slice() {
        ["health"] => get(Route::Health),
        ["metrics"] => get(Route::Metrics),
        ["ws"] => get(Route::UnifiedSocket),
        ["ws", name] => get(Route::AppSocket { app: app(name)? }),
        // An app literally named "stream" keeps POST for push; GET is the unified stream.
        ["sync", "stream"] => Ok(Some(Resource {
            get: Some(Route::UnifiedStream),
            post: Some(Route::Push {
                app: "stream".into(),
            }),
        })),
        ["sync", name] => Ok(Some(Resource {
            get: None,
            post: Some(Route::Push { app: app(name)? }),
        })),
        ["sync", name, "pull"] => get(Route::Pull { app: app(name)? }),
        ["sync", name, "stream"] => get(Route::AppStream { app: app(name)? }),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(method: Method, path: &str, expected: Routing) {
        assert_eq!(route(&method, path), expected, "{method} {path}");
    }

    fn found(route: Route) -> Routing {
        Routing::Found(route)
    }

    #[test]
    fn every_endpoint_of_the_spec() {
        let app = || "todo".to_string();
        check(
            Method::POST,
            "/sync/todo",
            found(Route::Push { app: app() }),
        );
        check(
            Method::GET,
            "/sync/todo/pull",
            found(Route::Pull { app: app() }),
        );
        check(
            Method::GET,
            "/sync/todo/stream",
            found(Route::AppStream { app: app() }),
        );
        check(Method::GET, "/sync/stream", found(Route::UnifiedStream));
        check(
            Method::POST,
            "/sync/stream",
            found(Route::Push {
                app: "stream".into(),
            }),
        );
        check(
            Method::GET,
            "/sync/stream/pull",
            found(Route::Pull {
                app: "stream".into(),
            }),
        );
        check(
            Method::GET,
            "/sync/stream/stream",
            found(Route::AppStream {
                app: "stream".into(),
            }),
        );
        check(Method::GET, "/ws", found(Route::UnifiedSocket));
        check(
            Method::GET,
            "/ws/todo",
            found(Route::AppSocket { app: app() }),
        );
        check(Method::GET, "/health", found(Route::Health));
        check(Method::GET, "/metrics", found(Route::Metrics));
        check(
            Method::POST,
            "/sync/my-app.v2_x",
            found(Route::Push {
                app: "my-app.v2_x".into(),
            }),
        );
    }

    /// `openapi.yaml` lists exactly the router's endpoints, and each of them routes.
    #[test]
    fn openapi_document_matches_the_router() {
        let document = include_str!("../../openapi.yaml");
        let mut documented = Vec::new();
        let mut path = None;
        let mut in_paths = false;
        for line in document.lines() {
            if line == "paths:" {
                in_paths = true;
                continue;
            }
            if !in_paths {
                continue;
            }
            if let Some(p) = line.strip_prefix("  /").and_then(|l| l.strip_suffix(':')) {
                path = Some(format!("/{p}"));
            } else if let Some(method) = line.strip_prefix("    ").and_then(|l| l.strip_suffix(':'))
            {
                if ["get", "post", "put", "delete", "options"].contains(&method) {
                    documented.push((
                        method.to_uppercase(),
                        path.clone().expect("a path before its methods"),
                    ));
                }
            }
        }
        let mut expected: Vec<(String, String)> = ENDPOINTS
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        documented.sort();
        expected.sort();
        assert_eq!(documented, expected);
        for (method, template) in ENDPOINTS {
            let path = template.replace("{appId}", "todo");
            let method: Method = method.parse().unwrap();
            assert!(
                matches!(route(&method, &path), Routing::Found(_)),
                "{method} {path}"
            );
        }
    }

    #[test]
    fn wrong_methods_unknown_paths_and_bad_ids() {
        check(
            Method::GET,
            "/sync/todo",
            Routing::MethodNotAllowed {
                allow: "POST, OPTIONS",
            },
        );
        check(
            Method::POST,
            "/sync/todo/pull",
            Routing::MethodNotAllowed {
                allow: "GET, OPTIONS",
            },
        );
        check(
            Method::DELETE,
            "/sync/stream",
            Routing::MethodNotAllowed {
                allow: "GET, POST, OPTIONS",
            },
        );
        check(
            Method::PUT,
            "/health",
            Routing::MethodNotAllowed {
                allow: "GET, OPTIONS",
            },
        );
        check(
            Method::OPTIONS,
            "/sync/todo",
            Routing::Preflight {
                allow: "POST, OPTIONS",
            },
        );
        for path in [
            "",
            "/",
            "/sync",
            "/sync/",
            "/sync/todo/",
            "/sync/todo/pull/x",
            "/nope",
            "health",
            "//sync/todo",
        ] {
            check(Method::GET, path, Routing::NotFound);
        }
        let long = format!("/sync/{}", "a".repeat(65));
        for path in [
            "/sync/to%20do",
            "/sync/t*do",
            long.as_str(),
            "/ws/ä",
            "/sync/a b/pull",
        ] {
            check(Method::POST, path, Routing::InvalidAppId);
        }
    }
}
