//! `wire_enum!`: a closed set of CamelCase strings as a Rust enum with `as_str`, `ALL` and `parse`.

/// Declares a fieldless enum whose variants travel as fixed strings.
///
/// Each variant is written `Variant = "WireName"`; the macro adds the serde
/// rename (so the JSON schema lists the wire names as an `enum`), `ALL`,
/// `as_str`, `parse` and `Display`. Variants keep their own doc comments and
/// may carry `#[default]` when the enum derives `Default`.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $wire:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(
            Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
            serde::Serialize, serde::Deserialize, schemars::JsonSchema,
        )]
        pub enum $name {
            $( $(#[$vmeta])* #[serde(rename = $wire)] $variant ),+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The string this variant has on the wire (in YAML, JSON and status).
            #[must_use]
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $wire),+
                }
            }

            /// The variant whose wire string is `text` (exact, case-sensitive match),
            /// or `None` for any other string.
            #[must_use]
            pub fn parse(text: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.as_str() == text)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
