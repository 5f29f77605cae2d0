//! The one Cedar schema every policy of the system is validated against.
//!
//! Entity ids: agents by name inside their namespace (`Agent::"research"`), tools as
//! `Tool::"<server>/<tool>"`, models as `Model::"<provider>/<model>"`.

use std::sync::LazyLock;

use cedar_policy::Schema;

/// The schema, in Cedar's human-readable syntax. It travels in every bundle so the sidecar
/// validates exactly what the compiler validated.
pub const SCHEMA: &str = r#"// Ringfence Cedar schema (v1alpha1)
entity Agent = {
  namespace: String,
  team: String,
  environment: String,
  trust: String,
};
entity Tool = {
  server: String,
  name: String,
  untrusted: Bool,
  sensitivity: String,
};
entity Model = {
  provider: String,
  name: String,
};
entity User;
type Call = {
  run: String,
  depth: Long,
  path: Set<Agent>,
  revisits: Long,
  tainted: Bool,
  taint: Set<String>,
  user: String,
};
action invoke appliesTo { principal: Agent, resource: Agent, context: Call };
action call_tool appliesTo { principal: Agent, resource: Tool, context: Call };
action call_model appliesTo { principal: Agent, resource: Model, context: Call };
action start_run appliesTo { principal: Agent, resource: Agent, context: Call };
"#;

/// The parsed schema. [`SCHEMA`] is a constant that a unit test parses, so this cannot fail at
/// run time unless the constant is edited into something invalid, which that test catches.
pub static PARSED: LazyLock<Schema> =
    LazyLock::new(|| match Schema::from_cedarschema_str(SCHEMA) {
        Ok((schema, _warnings)) => schema,
        Err(e) => panic!("the built-in Cedar schema does not parse: {e}"),
    });

#[cfg(test)]
mod tests {
    #[test]
    fn the_built_in_schema_parses_without_warnings() {
        let (_, warnings) = cedar_policy::Schema::from_cedarschema_str(super::SCHEMA).unwrap();
        assert_eq!(warnings.count(), 0);
    }
}
