//! Label and field selectors, as in `k8s.io/apimachinery/pkg/labels` and `pkg/fields`.
//!
//! # Label selectors
//!
//! [`LabelSelector`] parses the query-string syntax of the `labelSelector`
//! parameter (<https://kubernetes.io/docs/concepts/overview/working-with-objects/labels/#label-selectors>):
//! comma-separated requirements, each one of
//!
//! | syntax            | operator                     | matches an object that lacks the key |
//! |-------------------|------------------------------|--------------------------------------|
//! | `key=value`       | [`Operator::Equals`]         | no                                   |
//! | `key==value`      | [`Operator::DoubleEquals`]   | no                                   |
//! | `key!=value`      | [`Operator::NotEquals`]      | **yes**                              |
//! | `key in (a,b)`    | [`Operator::In`]             | no                                   |
//! | `key notin (a,b)` | [`Operator::NotIn`]          | **yes**                              |
//! | `key`             | [`Operator::Exists`]         | no                                   |
//! | `!key`            | [`Operator::DoesNotExist`]   | yes                                  |
//! | `key>3`, `key<3`  | [`Operator::GreaterThan`], [`Operator::LessThan`] | no (the label must be an integer) |
//!
//! Whitespace around tokens is ignored, and the empty string selects everything.
//! Keys are qualified names (`app.kubernetes.io/name`: an optional DNS-1123
//! subdomain prefix of at most 253 characters, then a name of at most 63);
//! values are empty or at most 63 characters, alphanumeric at both ends with
//! `-`, `_` and `.` inside. As in Kubernetes, the requirements of a parsed
//! selector are kept sorted by key (stable), which is the order [`Display`](fmt::Display)
//! renders them in.
//!
//! [`LabelSelector::from_label_selector_json`] converts a
//! `metav1.LabelSelector` object (`matchLabels` and `matchExpressions`), as
//! `LabelSelectorAsSelector` does, and `Display` renders any selector back to
//! the query syntax (what the scale subresource reports in `status.selector`).
//!
//! # Field selectors
//!
//! [`FieldSelector`] parses the `fieldSelector` parameter: comma-separated
//! terms `field=value`, `field==value` or `field!=value`. By default only
//! `metadata.name` and `metadata.namespace` are accepted, the fields every
//! resource supports; [`FieldSelector::parse_with_fields`] takes the extra
//! fields a resource supports (for example `spec.nodeName` for pods). Any
//! other field is refused with the apiserver's wording,
//! `field label not supported: spec.foo`. As in `pkg/fields`, a backslash
//! escapes `,`, `=`, `!` and `\` inside a value.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde_json::Value;

/// Longest label value and name part of a label key (`validation.LabelValueMaxLength`).
const NAME_MAX_LEN: usize = 63;
/// Longest DNS-1123 subdomain, the prefix of a label key.
const PREFIX_MAX_LEN: usize = 253;

/// Fields every resource supports in a field selector.
pub const DEFAULT_SELECTABLE_FIELDS: [&str; 2] = ["metadata.name", "metadata.namespace"];

/// A reason a label key or value is not a valid Kubernetes label key or value
/// (`k8s.io/apimachinery/pkg/util/validation`, `IsQualifiedName` and `IsValidLabelValue`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameProblem {
    /// The key, or the name part after the `/`, is empty.
    #[error("name part must be non-empty")]
    EmptyName,
    /// The key, or the name part after the `/`, is longer than 63 characters.
    #[error("name part must be no more than 63 characters")]
    NameTooLong,
    /// The name part has a character other than alphanumerics, `-`, `_`, `.`, or
    /// does not start and end with an alphanumeric character.
    #[error("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character")]
    NameCharacters,
    /// The key has more than one `/`.
    #[error("a qualified name must consist of an optional DNS subdomain prefix and '/' followed by a name part")]
    TooManySlashes,
    /// The prefix before the `/` is empty.
    #[error("prefix part must be non-empty")]
    EmptyPrefix,
    /// The prefix before the `/` is longer than 253 characters.
    #[error("prefix part must be no more than 253 characters")]
    PrefixTooLong,
    /// The prefix before the `/` is not a lowercase RFC 1123 subdomain.
    #[error("prefix part must be a lowercase RFC 1123 subdomain: lowercase alphanumeric characters, '-' or '.', starting and ending with an alphanumeric character")]
    PrefixCharacters,
    /// A label value is longer than 63 characters.
    #[error("a label value must be no more than 63 characters")]
    ValueTooLong,
    /// A label value has a character other than alphanumerics, `-`, `_`, `.`,
    /// or does not start and end with an alphanumeric character.
    #[error("a label value must be empty or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character")]
    ValueCharacters,
}

/// Why one requirement of a label selector is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequirementProblem {
    /// The requirement does not start with a key (or `!key`).
    #[error("expected a label key, found {found}")]
    ExpectedKey {
        /// What was found instead, quoted, or `end of input`.
        found: String,
    },
    /// The key is followed by something that is not an operator, `,` or the end.
    #[error("expected one of '=', '==', '!=', 'in', 'notin', '>', '<', ',' after the key, found {found}")]
    ExpectedOperator {
        /// What was found instead, quoted.
        found: String,
    },
    /// `in` or `notin` is not followed by `(`.
    #[error("expected '(' after '{operator}'")]
    ExpectedOpenParen {
        /// `in` or `notin`.
        operator: &'static str,
    },
    /// A value list has something other than a value, `,` or `)`.
    #[error("expected a value, ',' or ')' in the value list, found {found}")]
    ExpectedValueListItem {
        /// What was found instead, quoted, or `end of input`.
        found: String,
    },
    /// An operator that takes one value is followed by something else.
    #[error("expected a value after '{operator}', found {found}")]
    ExpectedValue {
        /// The operator, as written.
        operator: &'static str,
        /// What was found instead, quoted.
        found: String,
    },
    /// A complete requirement is followed by something other than `,` or the end.
    #[error("expected ',' or the end of the selector after the requirement, found {found}")]
    ExpectedComma {
        /// What was found instead, quoted.
        found: String,
    },
    /// `in`/`notin` (or `matchExpressions` `In`/`NotIn`) with no values.
    #[error("for 'in', 'notin' operators, values set can't be empty")]
    EmptyValues,
    /// `Exists`/`DoesNotExist` in `matchExpressions` with values.
    #[error("values set must be empty for exists and does not exist")]
    UnexpectedValues,
    /// `>`/`<` with a value that is not an integer.
    #[error("for 'gt', 'lt' operators, the value must be an integer: {value:?}")]
    NotAnInteger {
        /// The offending value.
        value: String,
    },
    /// The key is not a valid label key.
    #[error("invalid label key {key:?}: {problem}")]
    InvalidKey {
        /// The offending key.
        key: String,
        /// What is wrong with it.
        problem: NameProblem,
    },
    /// A value is not a valid label value.
    #[error("invalid label value {value:?}: {problem}")]
    InvalidValue {
        /// The offending value.
        value: String,
        /// What is wrong with it.
        problem: NameProblem,
    },
}

/// Why the shape of a `metav1.LabelSelector` JSON value is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeProblem {
    /// Expected a JSON object.
    #[error("must be an object")]
    NotAnObject,
    /// Expected a JSON array.
    #[error("must be an array")]
    NotAnArray,
    /// Expected a JSON string.
    #[error("must be a string")]
    NotAString,
    /// A required field is absent.
    #[error("is required")]
    Missing,
}

/// An error parsing or building a label or field selector.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// A requirement of a label selector string does not parse or is invalid.
    #[error("unable to parse requirement: {requirement:?}: {problem}")]
    Requirement {
        /// The requirement's text, trimmed (for example `a in b`).
        requirement: String,
        /// What is wrong with it.
        problem: RequirementProblem,
    },
    /// A `metav1.LabelSelector` value has the wrong JSON shape at `path`
    /// (for example `matchExpressions[0].values`).
    #[error("invalid label selector: {path}: {problem}")]
    Shape {
        /// Where in the selector object, dotted.
        path: String,
        /// What is wrong.
        problem: ShapeProblem,
    },
    /// A `matchExpressions` operator is not `In`, `NotIn`, `Exists` or `DoesNotExist`.
    #[error("{operator:?} is not a valid label selector operator")]
    UnknownOperator {
        /// The operator as written.
        operator: String,
    },
    /// A `matchLabels` entry or `matchExpressions` item of a
    /// `metav1.LabelSelector` is invalid.
    #[error("invalid label selector: {path}: {problem}")]
    InvalidSelectorRequirement {
        /// Where in the selector object (`matchLabels.app`, `matchExpressions[1]`).
        path: String,
        /// What is wrong with it.
        problem: RequirementProblem,
    },
    /// A field selector names a field the resource does not support.
    #[error("field label not supported: {field}")]
    UnsupportedField {
        /// The field as written.
        field: String,
    },
    /// A field selector term has no `=`, `==` or `!=`.
    #[error("invalid field selector: {term:?}: expected 'field=value', 'field==value' or 'field!=value'")]
    FieldTermWithoutOperator {
        /// The term as written.
        term: String,
    },
    /// A field selector ends inside a `\` escape.
    #[error("invalid field selector: {term:?}: a trailing '\\' escapes nothing")]
    DanglingEscape {
        /// The term as written.
        term: String,
    },
    /// A field selector uses `\` before a character that needs no escape.
    #[error("invalid field selector: {term:?}: invalid escape sequence '\\{escaped}'")]
    InvalidEscape {
        /// The term as written.
        term: String,
        /// The character after the backslash.
        escaped: char,
    },
}

/// The operator of one label selector requirement (`selection.Operator`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operator {
    /// `key=value`: the label is present and equal.
    Equals,
    /// `key==value`: same as [`Operator::Equals`], kept for faithful rendering.
    DoubleEquals,
    /// `key!=value`: the label is absent or different.
    NotEquals,
    /// `key in (a,b)`: the label is present and one of the values.
    In,
    /// `key notin (a,b)`: the label is absent or none of the values.
    NotIn,
    /// `key`: the label is present, whatever its value.
    Exists,
    /// `!key`: the label is absent.
    DoesNotExist,
    /// `key>n`: the label is present, an integer, and greater than `n`.
    GreaterThan,
    /// `key<n`: the label is present, an integer, and less than `n`.
    LessThan,
}

/// One requirement of a label selector: a key, an operator and its values.
///
/// Construct it with [`Requirement::new`], which validates it the way
/// `labels.NewRequirement` does; values are kept sorted and deduplicated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    key: String,
    operator: Operator,
    values: Vec<String>,
}

impl Requirement {
    /// Builds a validated requirement.
    ///
    /// # Errors
    ///
    /// [`RequirementProblem::InvalidKey`] for a key that is not a qualified name;
    /// [`RequirementProblem::EmptyValues`] for `In`/`NotIn` with no values;
    /// [`RequirementProblem::UnexpectedValues`] for `Exists`/`DoesNotExist` with values;
    /// [`RequirementProblem::NotAnInteger`] for `>`/`<` with a non-integer;
    /// [`RequirementProblem::InvalidValue`] for a value that is not a label value.
    /// `Equals`, `DoubleEquals`, `NotEquals`, `GreaterThan` and `LessThan` take
    /// exactly one value; any other count is refused with
    /// [`RequirementProblem::ExpectedValue`].
    pub fn new(
        key: impl Into<String>,
        operator: Operator,
        values: impl IntoIterator<Item = String>,
    ) -> Result<Self, RequirementProblem> {
        let key = key.into();
        validate_key(&key).map_err(|problem| RequirementProblem::InvalidKey {
            key: key.clone(),
            problem,
        })?;
        let mut values: Vec<String> = values.into_iter().collect();
        match operator {
            Operator::In | Operator::NotIn => {
                if values.is_empty() {
                    return Err(RequirementProblem::EmptyValues);
                }
            }
            Operator::Exists | Operator::DoesNotExist => {
                if !values.is_empty() {
                    return Err(RequirementProblem::UnexpectedValues);
                }
            }
            Operator::Equals
            | Operator::DoubleEquals
            | Operator::NotEquals
            | Operator::GreaterThan
            | Operator::LessThan => {
                if values.len() != 1 {
                    return Err(RequirementProblem::ExpectedValue {
                        operator: operator.symbol(),
                        found: format!("{} values", values.len()),
                    });
                }
            }
        }
        for value in &values {
            if matches!(operator, Operator::GreaterThan | Operator::LessThan) {
                if value.parse::<i64>().is_err() {
                    return Err(RequirementProblem::NotAnInteger {
                        value: value.clone(),
                    });
                }
            } else {
                validate_value(value).map_err(|problem| RequirementProblem::InvalidValue {
                    value: value.clone(),
                    problem,
                })?;
            }
        }
        values.sort();
        values.dedup();
        Ok(Self {
            key,
            operator,
            values,
        })
    }

    /// The label key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The operator.
    pub fn operator(&self) -> Operator {
        self.operator
    }

    /// The values, sorted and deduplicated (empty for `Exists`/`DoesNotExist`).
    pub fn values(&self) -> &[String] {
        &self.values
    }

    /// Whether a label set satisfies this requirement (`Requirement.Matches`).
    ///
    /// `!=`, `notin` and `!key` hold for a set that lacks the key; `>`/`<`
    /// hold only when the label's value is an integer.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let actual = labels.get(&self.key);
        let contains = |v: &String| self.values.binary_search(v).is_ok();
        match self.operator {
            Operator::Equals | Operator::DoubleEquals | Operator::In => {
                actual.is_some_and(contains)
            }
            Operator::NotEquals | Operator::NotIn => !actual.is_some_and(contains),
            Operator::Exists => actual.is_some(),
            Operator::DoesNotExist => actual.is_none(),
            Operator::GreaterThan | Operator::LessThan => {
                let (Some(actual), Some(bound)) = (
                    actual.and_then(|a| a.parse::<i64>().ok()),
                    self.values.first().and_then(|b| b.parse::<i64>().ok()),
                ) else {
                    return false;
                };
                if self.operator == Operator::GreaterThan {
                    actual > bound
                } else {
                    actual < bound
                }
            }
        }
    }
}

impl Operator {
    fn symbol(self) -> &'static str {
        match self {
            Operator::Equals => "=",
            Operator::DoubleEquals => "==",
            Operator::NotEquals => "!=",
            Operator::In => "in",
            Operator::NotIn => "notin",
            Operator::Exists => "exists",
            Operator::DoesNotExist => "!",
            Operator::GreaterThan => ">",
            Operator::LessThan => "<",
        }
    }
}

impl fmt::Display for Requirement {
    /// Renders as `Requirement.String` does: `key=v`, `key in (a,b)`, `!key`, ...
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.operator {
            Operator::DoesNotExist => write!(f, "!{}", self.key),
            Operator::Exists => f.write_str(&self.key),
            Operator::In | Operator::NotIn => write!(
                f,
                "{} {} ({})",
                self.key,
                self.operator.symbol(),
                self.values.join(",")
            ),
            op => write!(
                f,
                "{}{}{}",
                self.key,
                op.symbol(),
                self.values.first().map(String::as_str).unwrap_or("")
            ),
        }
    }
}

/// A label selector: the conjunction of its requirements (`labels.Selector`).
///
/// The default value has no requirements and matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
}

impl LabelSelector {
    /// A selector that matches every object (`labels.Everything()`).
    pub fn everything() -> Self {
        Self::default()
    }

    /// Builds a selector from requirements, sorting them by key (stable), as
    /// `internalSelector.Add` does.
    pub fn from_requirements(requirements: impl IntoIterator<Item = Requirement>) -> Self {
        let mut requirements: Vec<Requirement> = requirements.into_iter().collect();
        requirements.sort_by(|a, b| a.key.cmp(&b.key));
        Self { requirements }
    }

    /// The requirements, sorted by key.
    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    /// Whether the selector has no requirements and so matches everything.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Whether a label set satisfies every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Whether an object's `metadata.labels` satisfy every requirement.
    ///
    /// An object without labels has an empty label set; label values that are
    /// not strings are ignored.
    pub fn matches_object(&self, object: &Value) -> bool {
        self.matches(&object_labels(object))
    }

    /// Converts a `metav1.LabelSelector` JSON value, as `LabelSelectorAsSelector` does.
    ///
    /// Shape: `{"matchLabels": {"k": "v"}, "matchExpressions": [{"key": "k",
    /// "operator": "In|NotIn|Exists|DoesNotExist", "values": ["v"]}]}`.
    /// `matchLabels` entries become `key=value` requirements. `null`, `{}` and
    /// a selector with both fields empty match everything (note that in Go a
    /// *nil* `*LabelSelector` converts to "nothing"; callers that need that
    /// distinction check for an absent selector themselves).
    ///
    /// # Errors
    ///
    /// [`SelectorError::Shape`] when a part has the wrong JSON type or an
    /// expression lacks `key`/`operator`; [`SelectorError::UnknownOperator`] for
    /// an operator other than the four above; [`SelectorError::InvalidSelectorRequirement`]
    /// for an invalid key or value, `In`/`NotIn` without values, or
    /// `Exists`/`DoesNotExist` with values.
    pub fn from_label_selector_json(selector: &Value) -> Result<Self, SelectorError> {
        let object = match selector {
            Value::Null => return Ok(Self::everything()),
            Value::Object(object) => object,
            _ => {
                return Err(SelectorError::Shape {
                    path: "selector".to_owned(),
                    problem: ShapeProblem::NotAnObject,
                })
            }
        };
        let mut requirements = Vec::new();
        match object.get("matchLabels") {
            None | Some(Value::Null) => {}
            Some(Value::Object(labels)) => {
                for (key, value) in labels {
                    let path = format!("matchLabels.{key}");
                    let Value::String(value) = value else {
                        return Err(SelectorError::Shape {
                            path,
                            problem: ShapeProblem::NotAString,
                        });
                    };
                    let requirement =
                        Requirement::new(key.clone(), Operator::Equals, [value.clone()]).map_err(
                            |problem| SelectorError::InvalidSelectorRequirement { path, problem },
                        )?;
                    requirements.push(requirement);
                }
            }
            Some(_) => {
                return Err(SelectorError::Shape {
                    path: "matchLabels".to_owned(),
                    problem: ShapeProblem::NotAnObject,
                })
            }
        }
        match object.get("matchExpressions") {
            None | Some(Value::Null) => {}
            Some(Value::Array(expressions)) => {
                for (index, expression) in expressions.iter().enumerate() {
                    requirements.push(expression_requirement(index, expression)?);
                }
            }
            Some(_) => {
                return Err(SelectorError::Shape {
                    path: "matchExpressions".to_owned(),
                    problem: ShapeProblem::NotAnArray,
                })
            }
        }
        Ok(Self::from_requirements(requirements))
    }
}

/// Converts one `matchExpressions` item (`LabelSelectorRequirement`).
fn expression_requirement(index: usize, expression: &Value) -> Result<Requirement, SelectorError> {
    let base = format!("matchExpressions[{index}]");
    let shape = |field: &str, problem| SelectorError::Shape {
        path: if field.is_empty() {
            base.clone()
        } else {
            format!("{base}.{field}")
        },
        problem,
    };
    let Value::Object(expression) = expression else {
        return Err(shape("", ShapeProblem::NotAnObject));
    };
    let key = match expression.get("key") {
        Some(Value::String(key)) => key.clone(),
        None | Some(Value::Null) => return Err(shape("key", ShapeProblem::Missing)),
        Some(_) => return Err(shape("key", ShapeProblem::NotAString)),
    };
    let operator = match expression.get("operator") {
        Some(Value::String(op)) => match op.as_str() {
            "In" => Operator::In,
            "NotIn" => Operator::NotIn,
            "Exists" => Operator::Exists,
            "DoesNotExist" => Operator::DoesNotExist,
            _ => {
                return Err(SelectorError::UnknownOperator {
                    operator: op.clone(),
                })
            }
        },
        None | Some(Value::Null) => return Err(shape("operator", ShapeProblem::Missing)),
        Some(_) => return Err(shape("operator", ShapeProblem::NotAString)),
    };
    let values = match expression.get("values") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(values)) => values
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(shape(&format!("values[{i}]"), ShapeProblem::NotAString)),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(shape("values", ShapeProblem::NotAnArray)),
    };
    Requirement::new(key, operator, values).map_err(|problem| {
        SelectorError::InvalidSelectorRequirement {
            path: base.clone(),
            problem,
        }
    })
}

/// Reads `metadata.labels` as a string map, skipping non-string values.
fn object_labels(object: &Value) -> BTreeMap<String, String> {
    object
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|labels| {
            labels
                .iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

impl fmt::Display for LabelSelector {
    /// Renders the query syntax: requirements joined by `,`, empty for everything.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, requirement) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{requirement}")?;
        }
        Ok(())
    }
}

impl FromStr for LabelSelector {
    type Err = SelectorError;

    /// Parses the query-string syntax described in the [module docs](self).
    ///
    /// # Errors
    ///
    /// [`SelectorError::Requirement`] naming the first requirement that does not
    /// parse or is invalid, for example
    /// `unable to parse requirement: "a in b": expected '(' after 'in'`.
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let tokens = lex(input);
        let mut parser = Parser {
            tokens: &tokens,
            pos: 0,
        };
        let mut requirements = Vec::new();
        if parser.peek().kind == TokenKind::End {
            return Ok(Self::everything());
        }
        loop {
            let start = parser.peek().start;
            let requirement =
                parser
                    .requirement()
                    .map_err(|problem| SelectorError::Requirement {
                        requirement: requirement_text(input, start),
                        problem,
                    })?;
            requirements.push(requirement);
            let next = parser.next();
            match next.kind {
                TokenKind::End => break,
                TokenKind::Comma => {}
                _ => {
                    return Err(SelectorError::Requirement {
                        requirement: requirement_text(input, start),
                        problem: RequirementProblem::ExpectedComma {
                            found: describe(next),
                        },
                    })
                }
            }
        }
        Ok(Self::from_requirements(requirements))
    }
}

/// The text of the requirement starting at byte `start`: up to the next `,`
/// outside parentheses, trimmed.
fn requirement_text(input: &str, start: usize) -> String {
    let rest = &input[start.min(input.len())..];
    let mut depth = 0usize;
    let mut end = rest.len();
    for (i, c) in rest.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                end = i;
                break;
            }
            _ => {}
        }
    }
    rest[..end].trim().to_owned()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenKind {
    Identifier,
    Bang,
    Equals,
    DoubleEquals,
    NotEquals,
    GreaterThan,
    LessThan,
    OpenParen,
    CloseParen,
    Comma,
    End,
}

#[derive(Debug, Clone)]
struct Token {
    kind: TokenKind,
    text: String,
    start: usize,
}

/// Splits a selector into tokens; identifiers are runs of characters other
/// than whitespace and `!=(),<>` (as the lexer of `pkg/labels` does).
fn lex(input: &str) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut chars = input.char_indices().peekable();
    while let Some(&(start, c)) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        let single = |kind, len: usize| Token {
            kind,
            text: input[start..start + len].to_owned(),
            start,
        };
        let token = match c {
            '(' => single(TokenKind::OpenParen, 1),
            ')' => single(TokenKind::CloseParen, 1),
            ',' => single(TokenKind::Comma, 1),
            '>' => single(TokenKind::GreaterThan, 1),
            '<' => single(TokenKind::LessThan, 1),
            '=' if input[start..].starts_with("==") => {
                chars.next();
                single(TokenKind::DoubleEquals, 2)
            }
            '=' => single(TokenKind::Equals, 1),
            '!' if input[start..].starts_with("!=") => {
                chars.next();
                single(TokenKind::NotEquals, 2)
            }
            '!' => single(TokenKind::Bang, 1),
            _ => {
                let mut end = input.len();
                while let Some(&(i, c)) = chars.peek() {
                    if c.is_whitespace() || "!=(),<>".contains(c) {
                        end = i;
                        break;
                    }
                    chars.next();
                }
                tokens.push(Token {
                    kind: TokenKind::Identifier,
                    text: input[start..end].to_owned(),
                    start,
                });
                continue;
            }
        };
        chars.next();
        tokens.push(token);
    }
    tokens.push(Token {
        kind: TokenKind::End,
        text: String::new(),
        start: input.len(),
    });
    tokens
}

/// How a token is named in an error message.
fn describe(token: &Token) -> String {
    if token.kind == TokenKind::End {
        "end of input".to_owned()
    } else {
        format!("'{}'", token.text)
    }
}

struct Parser<'a> {
    tokens: &'a [Token],
    pos: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> &'a Token {
        &self.tokens[self.pos.min(self.tokens.len() - 1)]
    }

    fn next(&mut self) -> &'a Token {
        let token = self.peek();
        if token.kind != TokenKind::End {
            self.pos += 1;
        }
        token
    }

    /// One requirement: `!key`, `key`, `key op value` or `key in|notin (values)`.
    /// `in` and `notin` are operators only in operator position, so a key or a
    /// value may be spelled `in`.
    fn requirement(&mut self) -> Result<Requirement, RequirementProblem> {
        let first = self.next();
        let (negated, key) = match first.kind {
            TokenKind::Bang => {
                let key = self.next();
                if key.kind != TokenKind::Identifier {
                    return Err(RequirementProblem::ExpectedKey {
                        found: describe(key),
                    });
                }
                (true, key)
            }
            TokenKind::Identifier => (false, first),
            _ => {
                return Err(RequirementProblem::ExpectedKey {
                    found: describe(first),
                })
            }
        };
        if negated {
            return Requirement::new(key.text.clone(), Operator::DoesNotExist, []);
        }
        let op = self.peek();
        let (operator, values) = match op.kind {
            TokenKind::Comma | TokenKind::End => (Operator::Exists, Vec::new()),
            TokenKind::Equals | TokenKind::DoubleEquals | TokenKind::NotEquals => {
                self.next();
                let operator = match op.kind {
                    TokenKind::Equals => Operator::Equals,
                    TokenKind::DoubleEquals => Operator::DoubleEquals,
                    _ => Operator::NotEquals,
                };
                (operator, vec![self.single_value(operator)?])
            }
            TokenKind::GreaterThan | TokenKind::LessThan => {
                self.next();
                let operator = if op.kind == TokenKind::GreaterThan {
                    Operator::GreaterThan
                } else {
                    Operator::LessThan
                };
                (operator, vec![self.single_value(operator)?])
            }
            TokenKind::Identifier if op.text == "in" || op.text == "notin" => {
                self.next();
                let operator = if op.text == "in" {
                    Operator::In
                } else {
                    Operator::NotIn
                };
                (operator, self.value_list(operator)?)
            }
            _ => {
                return Err(RequirementProblem::ExpectedOperator {
                    found: describe(op),
                })
            }
        };
        Requirement::new(key.text.clone(), operator, values)
    }

    /// The value after `=`, `==`, `!=`, `>` or `<`; `key=` means the empty value.
    fn single_value(&mut self, operator: Operator) -> Result<String, RequirementProblem> {
        let token = self.peek();
        match token.kind {
            TokenKind::Identifier => {
                self.next();
                Ok(token.text.clone())
            }
            TokenKind::Comma | TokenKind::End => Ok(String::new()),
            _ => Err(RequirementProblem::ExpectedValue {
                operator: operator.symbol(),
                found: describe(token),
            }),
        }
    }

    /// `( v1, v2, ... )`; an empty slot between commas is the empty value.
    fn value_list(&mut self, operator: Operator) -> Result<Vec<String>, RequirementProblem> {
        if self.peek().kind != TokenKind::OpenParen {
            return Err(RequirementProblem::ExpectedOpenParen {
                operator: operator.symbol(),
            });
        }
        self.next();
        let mut values = Vec::new();
        if self.peek().kind == TokenKind::CloseParen {
            self.next();
            return Ok(values);
        }
        loop {
            let token = self.next();
            let value = match token.kind {
                TokenKind::Identifier => {
                    let value = token.text.clone();
                    let after = self.next();
                    match after.kind {
                        TokenKind::Comma => {
                            values.push(value);
                            continue;
                        }
                        TokenKind::CloseParen => {
                            values.push(value);
                            break;
                        }
                        _ => {
                            return Err(RequirementProblem::ExpectedValueListItem {
                                found: describe(after),
                            })
                        }
                    }
                }
                TokenKind::Comma => String::new(),
                TokenKind::CloseParen => {
                    values.push(String::new());
                    break;
                }
                _ => {
                    return Err(RequirementProblem::ExpectedValueListItem {
                        found: describe(token),
                    })
                }
            };
            values.push(value);
        }
        Ok(values)
    }
}

/// Checks a label key: `[prefix/]name` (`IsQualifiedName`).
fn validate_key(key: &str) -> Result<(), NameProblem> {
    let mut parts = key.split('/');
    let (prefix, name) = match (parts.next(), parts.next(), parts.next()) {
        (Some(name), None, _) => (None, name),
        (Some(prefix), Some(name), None) => (Some(prefix), name),
        _ => return Err(NameProblem::TooManySlashes),
    };
    if let Some(prefix) = prefix {
        if prefix.is_empty() {
            return Err(NameProblem::EmptyPrefix);
        }
        if prefix.len() > PREFIX_MAX_LEN {
            return Err(NameProblem::PrefixTooLong);
        }
        if !is_dns1123_subdomain(prefix) {
            return Err(NameProblem::PrefixCharacters);
        }
    }
    if name.is_empty() {
        return Err(NameProblem::EmptyName);
    }
    if name.len() > NAME_MAX_LEN {
        return Err(NameProblem::NameTooLong);
    }
    if !is_label_token(name) {
        return Err(NameProblem::NameCharacters);
    }
    Ok(())
}

/// Checks a label value (`IsValidLabelValue`): empty, or a label token of at most 63.
fn validate_value(value: &str) -> Result<(), NameProblem> {
    if value.len() > NAME_MAX_LEN {
        return Err(NameProblem::ValueTooLong);
    }
    if !value.is_empty() && !is_label_token(value) {
        return Err(NameProblem::ValueCharacters);
    }
    Ok(())
}

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`
fn is_label_token(s: &str) -> bool {
    let bytes = s.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            first.is_ascii_alphanumeric()
                && last.is_ascii_alphanumeric()
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        }
        _ => false,
    }
}

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*`
fn is_dns1123_subdomain(s: &str) -> bool {
    s.split('.').all(|label| {
        let bytes = label.as_bytes();
        let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        match (bytes.first(), bytes.last()) {
            (Some(first), Some(last)) => {
                alnum(first) && alnum(last) && bytes.iter().all(|b| alnum(b) || *b == b'-')
            }
            _ => false,
        }
    })
}

/// The operator of one field selector term.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FieldOperator {
    /// `field=value`.
    Equals,
    /// `field==value`.
    DoubleEquals,
    /// `field!=value`.
    NotEquals,
}

/// One term of a field selector: `field`, operator, `value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldRequirement {
    /// The dotted field path, for example `metadata.name`.
    pub field: String,
    /// The comparison.
    pub operator: FieldOperator,
    /// The value compared with, unescaped.
    pub value: String,
}

impl FieldRequirement {
    /// Whether `actual` (the field's value, `""` when absent) satisfies the term.
    pub fn matches_value(&self, actual: &str) -> bool {
        match self.operator {
            FieldOperator::Equals | FieldOperator::DoubleEquals => actual == self.value,
            FieldOperator::NotEquals => actual != self.value,
        }
    }
}

impl fmt::Display for FieldRequirement {
    /// Renders `field=value` with `,`, `=`, `!` and `\` in the value escaped.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = match self.operator {
            FieldOperator::Equals => "=",
            FieldOperator::DoubleEquals => "==",
            FieldOperator::NotEquals => "!=",
        };
        write!(f, "{}{op}", self.field)?;
        for c in self.value.chars() {
            if matches!(c, ',' | '=' | '!' | '\\') {
                f.write_str("\\")?;
            }
            write!(f, "{c}")?;
        }
        Ok(())
    }
}

/// A field selector: the conjunction of its terms (`fields.Selector`).
///
/// The default value has no terms and matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector {
    requirements: Vec<FieldRequirement>,
}

impl FieldSelector {
    /// A selector that matches every object.
    pub fn everything() -> Self {
        Self::default()
    }

    /// The terms, in the order written.
    pub fn requirements(&self) -> &[FieldRequirement] {
        &self.requirements
    }

    /// Whether the selector has no terms.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Parses a field selector accepting [`DEFAULT_SELECTABLE_FIELDS`] plus `extra_fields`.
    ///
    /// # Errors
    ///
    /// [`SelectorError::UnsupportedField`] for a field outside that set
    /// (`field label not supported: spec.foo`);
    /// [`SelectorError::FieldTermWithoutOperator`] for a term without
    /// `=`/`==`/`!=`; [`SelectorError::DanglingEscape`] and
    /// [`SelectorError::InvalidEscape`] for bad `\` escapes.
    pub fn parse_with_fields(input: &str, extra_fields: &[&str]) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        for term in split_unescaped_commas(input) {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            let (field, operator, raw_value) = split_term(term)?;
            let field = field.trim();
            if !DEFAULT_SELECTABLE_FIELDS.contains(&field) && !extra_fields.contains(&field) {
                return Err(SelectorError::UnsupportedField {
                    field: field.to_owned(),
                });
            }
            requirements.push(FieldRequirement {
                field: field.to_owned(),
                operator,
                value: unescape(term, raw_value.trim())?,
            });
        }
        Ok(Self { requirements })
    }

    /// Whether the given field values satisfy every term; a field missing from
    /// the map has the value `""`.
    pub fn matches(&self, fields: &BTreeMap<String, String>) -> bool {
        self.requirements
            .iter()
            .all(|r| r.matches_value(fields.get(&r.field).map(String::as_str).unwrap_or_default()))
    }

    /// Whether an object satisfies every term, reading each dotted field path
    /// from the object; a missing field reads as `""`, numbers and booleans as
    /// their JSON text.
    pub fn matches_object(&self, object: &Value) -> bool {
        self.requirements
            .iter()
            .all(|r| r.matches_value(&field_value(object, &r.field)))
    }
}

/// Reads a dotted path (`metadata.name`) as a string, `""` when absent or structured.
fn field_value(object: &Value, path: &str) -> String {
    let mut current = object;
    for part in path.split('.') {
        match current.get(part) {
            Some(next) => current = next,
            None => return String::new(),
        }
    }
    match current {
        Value::String(s) => s.clone(),
        Value::Bool(_) | Value::Number(_) => current.to_string(),
        _ => String::new(),
    }
}

/// Splits at commas not preceded by a backslash.
fn split_unescaped_commas(input: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (i, c) in input.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == ',' {
            parts.push(&input[start..i]);
            start = i + 1;
        }
    }
    parts.push(&input[start..]);
    parts
}

/// Splits one term at its first unescaped `!=`, `==` or `=`.
fn split_term(term: &str) -> Result<(&str, FieldOperator, &str), SelectorError> {
    let mut escaped = false;
    for (i, c) in term.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' => escaped = true,
            '!' if term[i..].starts_with("!=") => {
                return Ok((&term[..i], FieldOperator::NotEquals, &term[i + 2..]))
            }
            '=' if term[i..].starts_with("==") => {
                return Ok((&term[..i], FieldOperator::DoubleEquals, &term[i + 2..]))
            }
            '=' => return Ok((&term[..i], FieldOperator::Equals, &term[i + 1..])),
            _ => {}
        }
    }
    Err(SelectorError::FieldTermWithoutOperator {
        term: term.to_owned(),
    })
}

/// Removes `\` escapes from a field selector value.
fn unescape(term: &str, raw: &str) -> Result<String, SelectorError> {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some(escaped @ (',' | '=' | '!' | '\\')) => out.push(escaped),
            Some(escaped) => {
                return Err(SelectorError::InvalidEscape {
                    term: term.to_owned(),
                    escaped,
                })
            }
            None => {
                return Err(SelectorError::DanglingEscape {
                    term: term.to_owned(),
                })
            }
        }
    }
    Ok(out)
}

impl FromStr for FieldSelector {
    type Err = SelectorError;

    /// Parses a field selector accepting only [`DEFAULT_SELECTABLE_FIELDS`];
    /// see [`FieldSelector::parse_with_fields`] for the errors.
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        Self::parse_with_fields(input, &[])
    }
}

impl fmt::Display for FieldSelector {
    /// Renders the terms joined by `,`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, requirement) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{requirement}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn label_selector_matching_table() {
        let web = labels(&[("app", "web"), ("tier", "front"), ("replicas", "3")]);
        let bare = labels(&[]);
        let cases: &[(&str, bool, bool)] = &[
            // (selector, matches `web`, matches `bare`)
            ("", true, true),
            ("app=web", true, false),
            ("app==web", true, false),
            ("app = web", true, false),
            ("app=db", false, false),
            ("app!=db", true, true),
            ("app!=web", false, true),
            ("app in (web,db)", true, false),
            ("app in ( db , cache )", false, false),
            ("app notin (db)", true, true),
            ("app notin (web)", false, true),
            ("app", true, false),
            ("!app", false, true),
            ("! app", false, true),
            ("app,tier=front", true, false),
            ("app=web,tier=back", false, false),
            ("app=web, !missing", true, false),
            ("replicas>2", true, false),
            ("replicas<2", false, false),
            ("app>2", false, false),
        ];
        for (selector, want_web, want_bare) in cases {
            let parsed: LabelSelector = selector
                .parse()
                .unwrap_or_else(|e| panic!("{selector:?}: {e}"));
            assert_eq!(parsed.matches(&web), *want_web, "{selector:?} on web");
            assert_eq!(parsed.matches(&bare), *want_bare, "{selector:?} on bare");
        }
    }

    #[test]
    fn label_selector_round_trips_to_canonical_form() {
        let cases = [
            ("", ""),
            ("tier=front,app=web", "app=web,tier=front"),
            ("app==web", "app==web"),
            ("app in (b, a, a)", "app in (a,b)"),
            ("app notin(x)", "app notin (x)"),
            ("  !app.kubernetes.io/name ", "!app.kubernetes.io/name"),
            ("app.kubernetes.io/name", "app.kubernetes.io/name"),
            ("a!=", "a!="),
            ("n>5", "n>5"),
        ];
        for (input, want) in cases {
            let parsed: LabelSelector = input.parse().unwrap();
            assert_eq!(parsed.to_string(), want, "{input:?}");
            let again: LabelSelector = want.parse().unwrap();
            assert_eq!(again, parsed, "{input:?} re-parse");
        }
    }

    #[test]
    fn label_selector_errors_name_the_requirement() {
        let cases = [
            (
                "a in b",
                r#"unable to parse requirement: "a in b": expected '(' after 'in'"#,
            ),
            (
                "x=y, a notin b",
                r#"unable to parse requirement: "a notin b": expected '(' after 'notin'"#,
            ),
            (
                "a in ()",
                r#"unable to parse requirement: "a in ()": for 'in', 'notin' operators, values set can't be empty"#,
            ),
            (
                "a b",
                r#"unable to parse requirement: "a b": expected one of '=', '==', '!=', 'in', 'notin', '>', '<', ',' after the key, found 'b'"#,
            ),
            (
                "=x",
                r#"unable to parse requirement: "=x": expected a label key, found '='"#,
            ),
            (
                "a=b=c",
                r#"unable to parse requirement: "a=b=c": expected ',' or the end of the selector after the requirement, found '='"#,
            ),
            (
                "a,",
                r#"unable to parse requirement: "": expected a label key, found end of input"#,
            ),
            (
                "n>x",
                r#"unable to parse requirement: "n>x": for 'gt', 'lt' operators, the value must be an integer: "x""#,
            ),
            (
                "a in (x y)",
                r#"unable to parse requirement: "a in (x y)": expected a value, ',' or ')' in the value list, found 'y'"#,
            ),
        ];
        for (input, want) in cases {
            let err = input.parse::<LabelSelector>().unwrap_err();
            assert_eq!(err.to_string(), want, "{input:?}");
        }
    }

    #[test]
    fn label_keys_and_values_are_validated() {
        let bad = [
            ("-a=b", "name part must consist"),
            ("a/b/c=d", "optional DNS subdomain prefix"),
            ("/a=b", "prefix part must be non-empty"),
            ("Example.com/a=b", "lowercase RFC 1123"),
            ("a=-b", "a label value must be empty or consist"),
        ];
        for (input, fragment) in bad {
            let err = input.parse::<LabelSelector>().unwrap_err().to_string();
            assert!(err.contains(fragment), "{input:?}: {err}");
        }
        let long = "a".repeat(64);
        let err = format!("{long}=x").parse::<LabelSelector>().unwrap_err();
        assert!(matches!(
            err,
            SelectorError::Requirement {
                problem: RequirementProblem::InvalidKey {
                    problem: NameProblem::NameTooLong,
                    ..
                },
                ..
            }
        ));
        assert!("example.com/a_b.c-d=x_y.z-1"
            .parse::<LabelSelector>()
            .is_ok());
        assert!("a="
            .parse::<LabelSelector>()
            .unwrap()
            .matches(&labels(&[("a", "")])));
    }

    #[test]
    fn matches_object_reads_metadata_labels() {
        let selector: LabelSelector = "app=web".parse().unwrap();
        assert!(selector.matches_object(&json!({"metadata": {"labels": {"app": "web"}}})));
        assert!(!selector.matches_object(&json!({"metadata": {}})));
        assert!(!selector.matches_object(&json!({})));
        let negative: LabelSelector = "app!=web".parse().unwrap();
        assert!(negative.matches_object(&json!({"metadata": {"name": "x"}})));
    }

    #[test]
    fn from_label_selector_json() {
        let selector = LabelSelector::from_label_selector_json(&json!({
            "matchLabels": {"app": "web"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["front", "edge"]},
                {"key": "env", "operator": "NotIn", "values": ["dev"]},
                {"key": "canary", "operator": "DoesNotExist"},
                {"key": "zone", "operator": "Exists", "values": []}
            ]
        }))
        .unwrap();
        assert_eq!(
            selector.to_string(),
            "app=web,!canary,env notin (dev),tier in (edge,front),zone"
        );
        assert!(selector.matches(&labels(&[("app", "web"), ("tier", "edge"), ("zone", "a")])));
        assert!(!selector.matches(&labels(&[("app", "web"), ("tier", "edge")])));

        for everything in [
            json!(null),
            json!({}),
            json!({"matchLabels": {}, "matchExpressions": []}),
        ] {
            let selector = LabelSelector::from_label_selector_json(&everything).unwrap();
            assert!(selector.is_empty());
            assert_eq!(selector.to_string(), "");
        }
    }

    #[test]
    fn from_label_selector_json_errors() {
        let cases = [
            (
                json!({"matchExpressions": [{"key": "a", "operator": "Gt", "values": ["1"]}]}),
                r#""Gt" is not a valid label selector operator"#,
            ),
            (
                json!({"matchExpressions": [{"key": "a", "operator": "In", "values": []}]}),
                "invalid label selector: matchExpressions[0]: for 'in', 'notin' operators, values set can't be empty",
            ),
            (
                json!({"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}),
                "invalid label selector: matchExpressions[0]: values set must be empty for exists and does not exist",
            ),
            (
                json!({"matchExpressions": [{"operator": "Exists"}]}),
                "invalid label selector: matchExpressions[0].key: is required",
            ),
            (
                json!({"matchLabels": {"app": 1}}),
                "invalid label selector: matchLabels.app: must be a string",
            ),
            (json!({"matchLabels": []}), "invalid label selector: matchLabels: must be an object"),
            (json!("app=web"), "invalid label selector: selector: must be an object"),
        ];
        for (input, want) in cases {
            let err = LabelSelector::from_label_selector_json(&input).unwrap_err();
            assert_eq!(err.to_string(), want, "{input}");
        }
    }

    #[test]
    fn field_selector_matching_table() {
        let object =
            json!({"metadata": {"name": "web-0", "namespace": "prod"}, "spec": {"nodeName": "n1"}});
        let cases = [
            ("", true),
            ("metadata.name=web-0", true),
            ("metadata.name==web-0", true),
            ("metadata.name!=web-0", false),
            ("metadata.namespace=prod,metadata.name=web-0", true),
            ("metadata.namespace = prod , metadata.name!=web-1", true),
            ("metadata.namespace=dev", false),
            ("metadata.namespace!=", true),
        ];
        for (input, want) in cases {
            let selector: FieldSelector = input.parse().unwrap();
            assert_eq!(selector.matches_object(&object), want, "{input:?}");
        }
        let by_node =
            FieldSelector::parse_with_fields("spec.nodeName=n1", &["spec.nodeName"]).unwrap();
        assert!(by_node.matches_object(&object));
        let fields: BTreeMap<String, String> =
            [("metadata.name".to_owned(), "web-0".to_owned())].into();
        assert!("metadata.name=web-0"
            .parse::<FieldSelector>()
            .unwrap()
            .matches(&fields));
        assert!("metadata.namespace="
            .parse::<FieldSelector>()
            .unwrap()
            .matches(&fields));
    }

    #[test]
    fn field_selector_errors_and_escapes() {
        let cases = [
            ("spec.foo=bar", "field label not supported: spec.foo"),
            (
                "metadata.name",
                r#"invalid field selector: "metadata.name": expected 'field=value', 'field==value' or 'field!=value'"#,
            ),
            (
                "metadata.name=a\\",
                r#"invalid field selector: "metadata.name=a\\": a trailing '\' escapes nothing"#,
            ),
            (
                "metadata.name=a\\x",
                r#"invalid field selector: "metadata.name=a\\x": invalid escape sequence '\x'"#,
            ),
        ];
        for (input, want) in cases {
            let err = input.parse::<FieldSelector>().unwrap_err();
            assert_eq!(err.to_string(), want, "{input:?}");
        }
        let escaped: FieldSelector = "metadata.name=a\\,b\\=c".parse().unwrap();
        assert_eq!(escaped.requirements()[0].value, "a,b=c");
        assert_eq!(escaped.to_string(), "metadata.name=a\\,b\\=c");
        assert!(escaped.matches_object(&json!({"metadata": {"name": "a,b=c"}})));
    }
}
