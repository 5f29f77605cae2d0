//! Problems found in manifests, said so that the person who wrote them can fix them.

use std::fmt;

/// How bad a problem is: an error keeps the resource (or its new version) out of every bundle; a
/// warning is reported and the resource is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Error,
}

/// Which manifest a diagnostic is about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct ResourceRef {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ResourceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// A line and column, both counted from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

impl Location {
    /// The location of byte `offset` in `text`.
    pub fn of_offset(text: &str, offset: usize) -> Self {
        let offset = offset.min(text.len());
        let before = text.get(..offset).unwrap_or(text);
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before
            .get(line_start..)
            .map_or(1, |s| s.chars().count() + 1);
        Self { line, column }
    }
}

/// One problem in one manifest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    pub resource: ResourceRef,
    /// Where the manifest came from (a file in local mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// The field at fault, e.g. `spec.cedar` or `spec.allow[0].from[1]`.
    pub field: String,
    /// Where in the field's text (Cedar policies).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<Location>,
    pub message: String,
    /// A warning about a reference that names nothing (yet), e.g. an Agent that does not exist:
    /// the resource is used, and its `ResolvedRefs` condition says what is missing.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unresolved: bool,
}

impl Diagnostic {
    pub fn error(
        resource: &ResourceRef,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            severity: Severity::Error,
            resource: resource.clone(),
            origin: None,
            field: field.into(),
            location: None,
            message: message.into(),
            unresolved: false,
        }
    }

    pub fn warning(
        resource: &ResourceRef,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            severity: Severity::Warning,
            ..Self::error(resource, field, message)
        }
    }

    /// A warning that a reference names nothing yet: the resource is used meanwhile.
    pub fn unresolved(
        resource: &ResourceRef,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            unresolved: true,
            ..Self::warning(resource, field, message)
        }
    }

    /// Turns a Cedar error about `source` (the text of `field`) into diagnostics, one per label
    /// Cedar attached, with line and column.
    pub fn from_cedar(
        resource: &ResourceRef,
        field: &str,
        source: &str,
        err: &dyn miette::Diagnostic,
        message_prefix: &str,
    ) -> Self {
        let mut message = format!("{message_prefix}{err}");
        if let Some(help) = err.help() {
            message.push_str(&format!(" (help: {help})"));
        }
        let location = err
            .labels()
            .and_then(|mut labels| labels.next())
            .map(|label| Location::of_offset(source, label.offset()));
        Self {
            location,
            ..Self::error(resource, field, message)
        }
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{sev}: {}", self.resource)?;
        if let Some(origin) = &self.origin {
            write!(f, " ({origin})")?;
        }
        write!(f, ": {}", self.field)?;
        if let Some(loc) = self.location {
            write!(f, " line {}, column {}", loc.line, loc.column)?;
        }
        write!(f, ": {}", self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_become_lines_and_columns() {
        let text = "permit (\n  principal,\n  actoin\n);";
        let at = text.find("actoin").unwrap();
        assert_eq!(
            Location::of_offset(text, at),
            Location { line: 3, column: 3 }
        );
        assert_eq!(
            Location::of_offset(text, 0),
            Location { line: 1, column: 1 }
        );
        assert_eq!(Location::of_offset(text, 10_000).line, 4);
    }
}
