//! `/v1/usage`'s query parameters as a ledger query, scoped to what the
//! caller may see: its own tenant, or any tenant for admins.

use std::collections::HashMap;

use inferd_ledger::{GroupBy, UsageQuery};

use crate::clock;
use crate::tenants::Caller;

/// The query parameters `/v1/usage` takes.
pub const PARAMS: [&str; 5] = ["start", "end", "group_by", "tenant", "format"];

/// Why a usage query was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// A bad parameter (400), naming it when there is one.
    #[error("{message}")]
    Invalid { message: String, param: Option<&'static str> },
    /// Another tenant's usage asked for by a non-admin (403).
    #[error("{0}")]
    Forbidden(String),
}

impl QueryError {
    fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        QueryError::Invalid { message: message.into(), param }
    }
}

/// Parses the query into a ledger query, scoped to what the caller may see.
pub fn parse_query(q: &HashMap<String, String>, caller: &Caller) -> Result<(UsageQuery, bool), QueryError> {
    if let Some(unknown) = q.keys().find(|k| !PARAMS.contains(&k.as_str())) {
        return Err(QueryError::invalid(
            format!("unknown query parameter {unknown:?}; expected one of {}", PARAMS.join(", ")),
            None,
        ));
    }
    let time = |name: &'static str, default: i64| -> Result<i64, QueryError> {
        match q.get(name) {
            None => Ok(default),
            Some(v) => clock::parse_time(v).map(|s| s * 1000).ok_or_else(|| {
                QueryError::invalid(
                    format!(
                        "{name} must be Unix seconds, YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ between 1970 and 9999, got {v:?}"
                    ),
                    Some(name),
                )
            }),
        }
    };
    let now = clock::now_unix();
    let start_ms = time("start", clock::month_start(now) * 1000)?;
    let end_ms = time("end", clock::now_unix_ms() + 1)?;
    if end_ms <= start_ms {
        return Err(QueryError::invalid("end must be after start", Some("end")));
    }
    let mut group_by = Vec::new();
    for g in q.get("group_by").map(|s| s.split(',')).into_iter().flatten().filter(|g| !g.is_empty()) {
        let g = GroupBy::parse(g.trim()).ok_or_else(|| {
            QueryError::invalid(
                format!(
                    "group_by must be a comma-separated list of model, feature, day, tenant, key; got {g:?}"
                ),
                Some("group_by"),
            )
        })?;
        if !group_by.contains(&g) {
            group_by.push(g);
        }
    }
    let own = caller.tenant.id.to_string();
    let tenant = match (q.get("tenant"), caller.tenant.admin) {
        (Some(t), true) => Some(t.clone()),
        (None, true) => None,
        (Some(t), false) if *t != own => {
            return Err(QueryError::Forbidden(format!(
                "Only admin tenants may read another tenant's usage; this key belongs to `{own}`."
            )));
        }
        (_, false) => Some(own),
    };
    let csv = match q.get("format").map(String::as_str) {
        None | Some("json") => false,
        Some("csv") => true,
        Some(other) => {
            return Err(QueryError::invalid(
                format!("format must be json or csv, got {other:?}"),
                Some("format"),
            ));
        }
    };
    Ok((UsageQuery { start_ms, end_ms, tenant, group_by }, csv))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenants::{ConfigFile, Tenants, hash_key};

    fn caller(tenants: &Tenants, key: &str) -> Caller {
        tenants.authenticate(Some(Ok(&format!("Bearer {key}")))).unwrap()
    }

    fn query(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn queries_are_scoped_to_what_the_caller_may_see() {
        let text = format!(
            "[[tenants]]\nid = \"a\"\nkeys = [{{id = \"ka\", sha256 = \"{}\"}}]\n[[tenants]]\nid = \"ops\"\nadmin = true\nkeys = [{{id = \"ko\", sha256 = \"{}\"}}]\n",
            hash_key("key-a"),
            hash_key("key-ops")
        );
        let cfg: ConfigFile = toml::from_str(&text).unwrap();
        let tenants = Tenants::new(&cfg, &HashMap::new(), 0).unwrap();
        let (a, ops) = (caller(&tenants, "key-a"), caller(&tenants, "key-ops"));
        let (q, csv) = parse_query(&query(&[("group_by", "model,day,model")]), &a).unwrap();
        assert_eq!(q.tenant.as_deref(), Some("a"), "a tenant sees its own usage");
        assert_eq!(q.group_by, [GroupBy::parse("model").unwrap(), GroupBy::parse("day").unwrap()]);
        assert!(!csv);
        assert!(matches!(parse_query(&query(&[("tenant", "ops")]), &a), Err(QueryError::Forbidden(_))));
        let (q, csv) = parse_query(&query(&[("tenant", "a"), ("format", "csv")]), &ops).unwrap();
        assert_eq!((q.tenant.as_deref(), csv), (Some("a"), true), "admins see anyone's");
        assert_eq!(parse_query(&query(&[]), &ops).unwrap().0.tenant, None, "and everyone's");
        let bad = |pairs: &[(&str, &str)], param: Option<&str>| match parse_query(&query(pairs), &ops) {
            Err(QueryError::Invalid { param: p, .. }) => assert_eq!(p, param, "{pairs:?}"),
            other => panic!("{pairs:?} should be invalid, got {other:?}"),
        };
        bad(&[("start", "yesterday")], Some("start"));
        bad(&[("start", "2026-02-01"), ("end", "2026-01-01")], Some("end"));
        bad(&[("group_by", "colour")], Some("group_by"));
        bad(&[("format", "xml")], Some("format"));
        bad(&[("limit", "5")], None);
    }
}
