//! Reads the KMCL interface identifiers out of the text of the WDK header
//! `km/vmbuskernelmodeclientlibapi.h`.
//!
//! This file is shared, unchanged, by two crates:
//!
//! * `build.rs` (`#[path = "build/kmcl_header.rs"] mod kmcl_header;`), which runs it on the header
//!   of the installed WDK during a Windows driver build and writes `$OUT_DIR/kmcl_interface_ids.rs`;
//! * `tests/build_kmcl_header.rs`, which runs it on sample header text on every platform.
//!
//! It needs nothing but `std`. It never supplies a value of its own: a symbol that is absent,
//! defined twice with different values, or written in a form it cannot evaluate is an error that
//! names the symbol, and the build stops.
//!
//! What it understands (C translation phases 2 and 3, then a small constant evaluator):
//!
//! * backslash-newline line continuations, `/* */` and `//` comments (also inside argument lists);
//! * `DEFINE_GUID(NAME, l, w1, w2, b1, ..., b8)` and `EXTERN_GUID(...)` with the same argument
//!   list, anywhere outside preprocessor directives, and the initializer form
//!   `... NAME = { l, w1, w2, { b1, ..., b8 } }`;
//! * object-like `#define NAME value` lines;
//! * integer literals in hexadecimal (`0x`), binary (`0b`), octal (leading `0`) or decimal, with
//!   any of the `u`/`U`/`l`/`L` suffixes and the Microsoft `i8`..`i64`/`ui8`..`ui64` suffixes;
//! * parentheses, casts such as `(USHORT)`, the operators `|`, `+` and `<<`, and references to
//!   other object-like macros defined in the same text.
#![allow(dead_code)] // `build.rs` and the test crate each use a different subset.

use std::collections::BTreeMap;
use std::fmt;

/// File name of the header, relative to a WDK `km` include directory.
pub(crate) const HEADER_FILE_NAME: &str = "vmbuskernelmodeclientlibapi.h";
/// The GUID of the KMCL server interface (queried by a VSP with `WdfFdoQueryForInterface`).
pub(crate) const SERVER_INTERFACE_TYPE: &str = "KMCL_SERVER_INTERFACE_TYPE";
/// The GUID of the KMCL client interface.
pub(crate) const CLIENT_INTERFACE_TYPE: &str = "KMCL_CLIENT_INTERFACE_TYPE";
/// The `Version` to pass with `sizeof(KMCL_SERVER_INTERFACE_V1)`.
pub(crate) const SERVER_INTERFACE_VERSION_V1: &str = "KMCL_SERVER_INTERFACE_VERSION_V1";

/// Macros whose argument list is `(NAME, l, w1, w2, b1, b2, b3, b4, b5, b6, b7, b8)`
/// (`guiddef.h` / `cguid.h`).
const GUID_MACROS: [&str; 2] = ["DEFINE_GUID", "EXTERN_GUID"];

/// How deep `#define A B` / `#define B 1` chains are followed before giving up.
const MAX_MACRO_DEPTH: usize = 16;

/// A GUID as the four `GUID` fields of `guiddef.h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Guid {
    pub(crate) data1: u32,
    pub(crate) data2: u16,
    pub(crate) data3: u16,
    pub(crate) data4: [u8; 8],
}

impl fmt::Display for Guid {
    /// Registry format, `{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.data4;
        write!(
            f,
            "{{{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}}}",
            self.data1, self.data2, self.data3, d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]
        )
    }
}

/// Everything vmbsrv takes from the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct KmclIds {
    /// `KMCL_SERVER_INTERFACE_TYPE`.
    pub(crate) server_interface_type: Guid,
    /// `KMCL_CLIENT_INTERFACE_TYPE`.
    pub(crate) client_interface_type: Guid,
    /// `KMCL_SERVER_INTERFACE_VERSION_V1` (the `USHORT Version` of the interface query).
    pub(crate) server_interface_version_v1: u16,
}

/// Why a symbol could not be read. `Display` names the symbol; the caller adds the header path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum HeaderError {
    /// No definition of the symbol in the header.
    Missing {
        symbol: String,
        expected: &'static str,
    },
    /// A definition exists but could not be evaluated to a value of the right type.
    Malformed { symbol: String, reason: String },
    /// Two definitions disagree (for example under different `#if` branches).
    Conflicting {
        symbol: String,
        first: String,
        second: String,
    },
}

impl HeaderError {
    /// The symbol the error is about.
    pub(crate) fn symbol(&self) -> &str {
        match self {
            Self::Missing { symbol, .. }
            | Self::Malformed { symbol, .. }
            | Self::Conflicting { symbol, .. } => symbol,
        }
    }
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing { symbol, expected } => {
                write!(f, "`{symbol}` is not defined (expected {expected})")
            }
            Self::Malformed { symbol, reason } => {
                write!(f, "the definition of `{symbol}` cannot be read: {reason}")
            }
            Self::Conflicting {
                symbol,
                first,
                second,
            } => write!(
                f,
                "`{symbol}` is defined more than once with different values ({first} and {second})"
            ),
        }
    }
}

impl std::error::Error for HeaderError {}

/// Decodes the bytes of a header file: UTF-8 (with or without BOM), or UTF-16 with a BOM.
/// Bytes that are not valid in the detected encoding become U+FFFD; they can only matter if they
/// sit inside a definition, which then fails to parse.
pub(crate) fn decode_header_bytes(bytes: &[u8]) -> String {
    fn utf16(bytes: &[u8], unit: fn([u8; 2]) -> u16) -> String {
        let units: Vec<u16> = bytes
            .chunks_exact(2)
            .map(|pair| unit([pair[0], pair[1]]))
            .collect();
        String::from_utf16_lossy(&units)
    }
    match bytes {
        [0xEF, 0xBB, 0xBF, rest @ ..] => String::from_utf8_lossy(rest).into_owned(),
        [0xFF, 0xFE, rest @ ..] => utf16(rest, u16::from_le_bytes),
        [0xFE, 0xFF, rest @ ..] => utf16(rest, u16::from_be_bytes),
        _ => String::from_utf8_lossy(bytes).into_owned(),
    }
}

/// Reads the three identifiers vmbsrv needs. The first problem found is returned.
pub(crate) fn extract_kmcl_ids(header_text: &str) -> Result<KmclIds, HeaderError> {
    let header = Header::parse(header_text);
    Ok(KmclIds {
        server_interface_type: header.guid(SERVER_INTERFACE_TYPE)?,
        client_interface_type: header.guid(CLIENT_INTERFACE_TYPE)?,
        server_interface_version_v1: header.define_u16(SERVER_INTERFACE_VERSION_V1)?,
    })
}

/// Renders `$OUT_DIR/kmcl_interface_ids.rs`: three documented `pub const` items that
/// `src/kmcl/interface_id.rs` includes. `header_path` is only quoted in comments.
pub(crate) fn render_rust(ids: &KmclIds, header_path: &str) -> String {
    fn guid_expr(g: &Guid) -> String {
        let bytes: Vec<String> = g.data4.iter().map(|b| format!("0x{b:02x}")).collect();
        format!(
            "crate::kmcl::raw::GUID {{\n    Data1: 0x{:08x},\n    Data2: 0x{:04x},\n    Data3: 0x{:04x},\n    Data4: [{}],\n}}",
            g.data1,
            g.data2,
            g.data3,
            bytes.join(", ")
        )
    }
    // A path cannot contain a newline on Windows, but the text goes into comments: keep it one line.
    let header_path: String = header_path
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    format!(
        "// @generated by vmbsrv's build.rs (build/kmcl_header.rs). Do not edit.\n\
         // Source: {header_path}\n\
         \n\
         /// `KMCL_SERVER_INTERFACE_TYPE` ({server}): the interface type a VSP passes to\n\
         /// `WdfFdoQueryForInterface` / `WdfIoTargetQueryForInterface` for `KMCL_SERVER_INTERFACE_V1`.\n\
         ///\n\
         /// Read at build time from the installed WDK's `{HEADER_FILE_NAME}`.\n\
         pub const KMCL_SERVER_INTERFACE_TYPE: crate::kmcl::raw::GUID = {server_expr};\n\
         \n\
         /// `KMCL_CLIENT_INTERFACE_TYPE` ({client}): the interface type of `KMCL_CLIENT_INTERFACE_V1`.\n\
         ///\n\
         /// Read at build time from the installed WDK's `{HEADER_FILE_NAME}`.\n\
         pub const KMCL_CLIENT_INTERFACE_TYPE: crate::kmcl::raw::GUID = {client_expr};\n\
         \n\
         /// `KMCL_SERVER_INTERFACE_VERSION_V1`: the `Version` to pass with\n\
         /// `size_of::<KMCL_SERVER_INTERFACE_V1>()`.\n\
         ///\n\
         /// Read at build time from the installed WDK's `{HEADER_FILE_NAME}`.\n\
         pub const KMCL_SERVER_INTERFACE_VERSION_V1: u16 = {version};\n",
        server = ids.server_interface_type,
        client = ids.client_interface_type,
        server_expr = guid_expr(&ids.server_interface_type),
        client_expr = guid_expr(&ids.client_interface_type),
        version = ids.server_interface_version_v1,
    )
}

/// A header reduced to what the extractor needs: the object-like `#define`s and the tokens of
/// every line that is not a preprocessor directive.
#[derive(Debug, Default)]
pub(crate) struct Header {
    /// Every object-like `#define NAME body`, in order of appearance (a name may repeat).
    defines: BTreeMap<String, Vec<Vec<Token>>>,
    /// Function-like macro names (`#define NAME(...)`): never evaluated as values.
    function_like: Vec<String>,
    /// The tokens of the non-directive text, in order.
    code: Vec<Token>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Ident(String),
    Number(String),
    Punct(&'static str),
    /// A string or character literal (kept so that it separates tokens; never evaluated).
    Literal,
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ident(s) | Self::Number(s) => f.write_str(s),
            Self::Punct(p) => f.write_str(p),
            Self::Literal => f.write_str("<literal>"),
        }
    }
}

impl Header {
    /// Splices continuation lines, removes comments, then splits the text into directive lines
    /// (of which object-like `#define`s are kept) and code tokens.
    pub(crate) fn parse(text: &str) -> Self {
        let clean = strip_comments(&splice_lines(text));
        let mut header = Self::default();
        for line in clean.lines() {
            let trimmed = line.trim_start();
            if let Some(directive) = trimmed.strip_prefix('#') {
                header.add_directive(directive);
            } else {
                header.code.extend(tokenize(line));
            }
        }
        header
    }

    fn add_directive(&mut self, directive: &str) {
        let directive = directive.trim_start();
        let Some(rest) = directive.strip_prefix("define") else {
            return;
        };
        if !rest.starts_with(|c: char| c.is_whitespace()) {
            return; // `#defined`, `#define_foo`, ...
        }
        let rest = rest.trim_start();
        let name_len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        if name_len == 0 {
            return;
        }
        let (name, body) = rest.split_at(name_len);
        if body.starts_with('(') {
            // Function-like: `#define NAME(` with no space before the parenthesis.
            self.function_like.push(name.to_owned());
            return;
        }
        self.defines
            .entry(name.to_owned())
            .or_default()
            .push(tokenize(body));
    }

    /// The single value of a GUID symbol, from every `DEFINE_GUID`/`EXTERN_GUID` use and every
    /// `NAME = { ... }` initializer in the code.
    pub(crate) fn guid(&self, symbol: &str) -> Result<Guid, HeaderError> {
        let mut found: Option<Guid> = None;
        let code = &self.code;
        for (i, token) in code.iter().enumerate() {
            let Token::Ident(ident) = token else {
                continue;
            };
            let fields = if GUID_MACROS.contains(&ident.as_str())
                && code.get(i + 1) == Some(&Token::Punct("("))
                && matches!(code.get(i + 2), Some(Token::Ident(n)) if n == symbol)
            {
                let args = balanced_group(code, i + 1, "(", ")").ok_or_else(|| {
                    malformed(symbol, format!("unterminated `{ident}(` argument list"))
                })?;
                // args[0] is the symbol, args[1] the comma after it.
                if args.get(1) != Some(&Token::Punct(",")) {
                    return Err(malformed(
                        symbol,
                        format!("`{ident}` expects `{symbol},` first"),
                    ));
                }
                split_top_level_commas(&args[2..])
            } else if ident == symbol
                && code.get(i + 1) == Some(&Token::Punct("="))
                && code.get(i + 2) == Some(&Token::Punct("{"))
            {
                let inner = balanced_group(code, i + 2, "{", "}")
                    .ok_or_else(|| malformed(symbol, "unterminated `{` initializer".to_owned()))?;
                let flat: Vec<Token> = inner
                    .into_iter()
                    .filter(|t| *t != Token::Punct("{") && *t != Token::Punct("}"))
                    .collect();
                split_top_level_commas(&flat)
            } else {
                continue;
            };
            let guid = self.guid_from_fields(symbol, &fields)?;
            match found {
                Some(previous) if previous != guid => {
                    return Err(HeaderError::Conflicting {
                        symbol: symbol.to_owned(),
                        first: previous.to_string(),
                        second: guid.to_string(),
                    });
                }
                _ => found = Some(guid),
            }
        }
        found.ok_or_else(|| HeaderError::Missing {
            symbol: symbol.to_owned(),
            expected: "`DEFINE_GUID(NAME, 0x..., 0x..., 0x..., 0x.., 0x.., 0x.., 0x.., 0x.., 0x.., 0x.., 0x..)`",
        })
    }

    fn guid_from_fields(&self, symbol: &str, fields: &[Vec<Token>]) -> Result<Guid, HeaderError> {
        // A trailing comma (`{ ..., 0x12, }`) leaves an empty last field.
        let fields: Vec<&Vec<Token>> = match fields.split_last() {
            Some((last, rest)) if last.is_empty() => rest.iter().collect(),
            _ => fields.iter().collect(),
        };
        if fields.len() != 11 {
            return Err(malformed(
                symbol,
                format!(
                    "expected 11 numbers (Data1, Data2, Data3, 8 bytes of Data4), found {}",
                    fields.len()
                ),
            ));
        }
        let mut values = [0u128; 11];
        for (slot, field) in values.iter_mut().zip(&fields) {
            *slot = self
                .evaluate(field, 0)
                .map_err(|reason| malformed(symbol, reason))?;
        }
        let narrow = |index: usize, max: u128, what: &str| {
            if values[index] > max {
                Err(malformed(
                    symbol,
                    format!("{what} = {:#x} does not fit in {:#x}", values[index], max),
                ))
            } else {
                Ok(values[index])
            }
        };
        let data1 = u32::try_from(narrow(0, u32::MAX.into(), "Data1")?).unwrap_or_default();
        let data2 = u16::try_from(narrow(1, u16::MAX.into(), "Data2")?).unwrap_or_default();
        let data3 = u16::try_from(narrow(2, u16::MAX.into(), "Data3")?).unwrap_or_default();
        let mut data4 = [0u8; 8];
        for (k, byte) in data4.iter_mut().enumerate() {
            let what = format!("Data4[{k}]");
            *byte = u8::try_from(narrow(3 + k, u8::MAX.into(), &what)?).unwrap_or_default();
        }
        Ok(Guid {
            data1,
            data2,
            data3,
            data4,
        })
    }

    /// The single value of an object-like `#define`, as an unsigned integer.
    pub(crate) fn define_value(&self, symbol: &str) -> Result<u128, HeaderError> {
        let Some(bodies) = self.defines.get(symbol) else {
            return Err(HeaderError::Missing {
                symbol: symbol.to_owned(),
                expected: "`#define NAME <integer>`",
            });
        };
        let mut found: Option<u128> = None;
        for body in bodies {
            let value = self
                .evaluate(body, 1)
                .map_err(|reason| malformed(symbol, reason))?;
            match found {
                Some(previous) if previous != value => {
                    return Err(HeaderError::Conflicting {
                        symbol: symbol.to_owned(),
                        first: previous.to_string(),
                        second: value.to_string(),
                    });
                }
                _ => found = Some(value),
            }
        }
        found.ok_or_else(|| HeaderError::Missing {
            symbol: symbol.to_owned(),
            expected: "`#define NAME <integer>`",
        })
    }

    /// [`Self::define_value`] narrowed to `USHORT`.
    pub(crate) fn define_u16(&self, symbol: &str) -> Result<u16, HeaderError> {
        let value = self.define_value(symbol)?;
        u16::try_from(value).map_err(|_| {
            malformed(
                symbol,
                format!("{value:#x} does not fit in a USHORT interface version"),
            )
        })
    }

    /// Evaluates a constant expression. `depth` counts macro expansions in progress.
    fn evaluate(&self, tokens: &[Token], depth: usize) -> Result<u128, String> {
        if tokens.is_empty() {
            return Err("empty value".to_owned());
        }
        let mut parser = ExprParser {
            header: self,
            tokens,
            pos: 0,
            depth,
        };
        let value = parser.bit_or()?;
        if let Some(extra) = tokens.get(parser.pos) {
            return Err(format!(
                "unsupported token `{extra}` in `{}`",
                join_tokens(tokens)
            ));
        }
        Ok(value)
    }
}

fn malformed(symbol: &str, reason: String) -> HeaderError {
    HeaderError::Malformed {
        symbol: symbol.to_owned(),
        reason,
    }
}

fn join_tokens(tokens: &[Token]) -> String {
    tokens
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Recursive-descent evaluator for the small expression subset headers use for constants:
/// `bit_or := shift ('|' shift)*`, `shift := sum ('<<' sum)*`, `sum := primary ('+' primary)*`,
/// `primary := number | macro-name | '(' bit_or ')' | '(' type-name ')' primary`.
struct ExprParser<'a> {
    header: &'a Header,
    tokens: &'a [Token],
    pos: usize,
    depth: usize,
}

impl ExprParser<'_> {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn eat(&mut self, punct: &str) -> bool {
        if matches!(self.peek(), Some(Token::Punct(p)) if *p == punct) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn bit_or(&mut self) -> Result<u128, String> {
        let mut value = self.shift()?;
        while self.eat("|") {
            value |= self.shift()?;
        }
        Ok(value)
    }

    fn shift(&mut self) -> Result<u128, String> {
        let mut value = self.sum()?;
        while self.eat("<<") {
            let amount = self.sum()?;
            value = u32::try_from(amount)
                .ok()
                .and_then(|n| value.checked_shl(n))
                .filter(|v| v.leading_zeros() >= 64)
                .ok_or_else(|| format!("`{value} << {amount}` overflows 64 bits"))?;
        }
        Ok(value)
    }

    fn sum(&mut self) -> Result<u128, String> {
        let mut value = self.primary()?;
        while self.eat("+") {
            let rhs = self.primary()?;
            value = value
                .checked_add(rhs)
                .filter(|v| v.leading_zeros() >= 64)
                .ok_or_else(|| format!("`{value} + {rhs}` overflows 64 bits"))?;
        }
        Ok(value)
    }

    fn primary(&mut self) -> Result<u128, String> {
        match self.peek().cloned() {
            Some(Token::Number(text)) => {
                self.pos += 1;
                parse_integer_literal(&text)
            }
            Some(Token::Ident(name)) => {
                self.pos += 1;
                self.expand(&name)
            }
            Some(Token::Punct("(")) => {
                if let Some(after_cast) = self.cast_end() {
                    self.pos = after_cast;
                    return self.primary();
                }
                self.pos += 1;
                let value = self.bit_or()?;
                if !self.eat(")") {
                    return Err("missing `)`".to_owned());
                }
                Ok(value)
            }
            Some(other) => Err(format!("unexpected `{other}`")),
            None => Err("expression ends early".to_owned()),
        }
    }

    /// If the tokens at `pos` are a cast `( type-name [*] )` followed by an operand, returns the
    /// position after the `)`. A type name is one or more identifiers that are not macros.
    fn cast_end(&self) -> Option<usize> {
        let mut i = self.pos + 1;
        let mut idents = 0;
        while let Some(Token::Ident(name)) = self.tokens.get(i) {
            if self.header.defines.contains_key(name) {
                return None;
            }
            idents += 1;
            i += 1;
        }
        if idents == 0 || self.tokens.get(i) != Some(&Token::Punct(")")) {
            return None;
        }
        i += 1;
        match self.tokens.get(i) {
            Some(Token::Number(_) | Token::Ident(_) | Token::Punct("(")) => Some(i),
            _ => None,
        }
    }

    fn expand(&self, name: &str) -> Result<u128, String> {
        if self.header.function_like.iter().any(|f| f == name) {
            return Err(format!("`{name}` is a function-like macro"));
        }
        let Some(bodies) = self.header.defines.get(name) else {
            return Err(format!(
                "`{name}` is not an object-like macro of this header"
            ));
        };
        if self.depth >= MAX_MACRO_DEPTH {
            return Err(format!(
                "macro `{name}` nests deeper than {MAX_MACRO_DEPTH} levels"
            ));
        }
        let mut found: Option<u128> = None;
        for body in bodies {
            let value = self.header.evaluate(body, self.depth + 1)?;
            if found.is_some_and(|previous| previous != value) {
                return Err(format!("macro `{name}` has conflicting definitions"));
            }
            found = Some(value);
        }
        found.ok_or_else(|| format!("macro `{name}` has no definition"))
    }
}

/// Parses a C integer literal with optional suffixes.
pub(crate) fn parse_integer_literal(text: &str) -> Result<u128, String> {
    let lower = text.to_ascii_lowercase();
    // Suffixes: u, l, ul, lu, ll, ull, llu (any case), and Microsoft i8/i16/i32/i64, ui8...ui64.
    let mut digits = lower.as_str();
    for suffix in ["ui64", "ui32", "ui16", "ui8", "i64", "i32", "i16", "i8"] {
        if let Some(stripped) = digits.strip_suffix(suffix) {
            digits = stripped;
            break;
        }
    }
    digits = digits.trim_end_matches(['u', 'l']);
    let (radix, body) = if let Some(hex) = digits.strip_prefix("0x") {
        (16, hex)
    } else if let Some(bin) = digits.strip_prefix("0b") {
        (2, bin)
    } else if digits.len() > 1 && digits.starts_with('0') {
        (8, &digits[1..])
    } else {
        (10, digits)
    };
    if body.is_empty() {
        return Err(format!("`{text}` is not an integer literal"));
    }
    let value = u128::from_str_radix(body, radix)
        .map_err(|_| format!("`{text}` is not an integer literal"))?;
    if value > u128::from(u64::MAX) {
        return Err(format!("`{text}` does not fit in 64 bits"));
    }
    Ok(value)
}

/// Translation phase 2: deletes every backslash immediately followed by a newline (`\n` or `\r\n`).
pub(crate) fn splice_lines(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let mut lookahead = chars.clone();
            if lookahead.peek() == Some(&'\r') {
                lookahead.next();
            }
            if lookahead.peek() == Some(&'\n') {
                lookahead.next();
                chars = lookahead;
                continue;
            }
        }
        out.push(c);
    }
    out
}

/// Translation phase 3 (comments only): replaces each comment by one space. String and character
/// literals are copied through untouched, so `"//"` inside them does not start a comment.
pub(crate) fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => {
                // Line comment: keep the newline that ends it.
                for next in chars.by_ref() {
                    if next == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut previous = '\0';
                for next in chars.by_ref() {
                    if previous == '*' && next == '/' {
                        break;
                    }
                    previous = next;
                }
                out.push(' ');
            }
            '"' | '\'' => {
                out.push(c);
                let mut escaped = false;
                for next in chars.by_ref() {
                    out.push(next);
                    if escaped {
                        escaped = false;
                    } else if next == '\\' {
                        escaped = true;
                    } else if next == c || next == '\n' {
                        break;
                    }
                }
            }
            _ => out.push(c),
        }
    }
    out
}

fn tokenize(line: &str) -> Vec<Token> {
    const PUNCTS: [&str; 10] = ["<<", "(", ")", "{", "}", ",", "=", "|", "+", "*"];
    let mut tokens = Vec::new();
    let bytes = line.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            tokens.push(Token::Ident(line[start..i].to_owned()));
        } else if c.is_ascii_digit() {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            tokens.push(Token::Number(line[start..i].to_owned()));
        } else if c == b'"' || c == b'\'' {
            i += 1;
            while i < bytes.len() && bytes[i] != c {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            tokens.push(Token::Literal);
        } else if let Some(p) = PUNCTS.iter().find(|p| line[i..].starts_with(**p)) {
            tokens.push(Token::Punct(p));
            i += p.len();
        } else {
            // Any other character (`;`, `#`, `-`, a non-ASCII byte...) separates tokens. Keep a
            // marker so that, e.g., `A ; = {` is not read as `A = {`.
            let width = line[i..].chars().next().map_or(1, char::len_utf8);
            tokens.push(Token::Punct("?"));
            i += width;
        }
    }
    tokens
}

/// The tokens strictly inside the group that opens at `open_at` (which must hold `open`),
/// or `None` if the group is not closed.
fn balanced_group(
    tokens: &[Token],
    open_at: usize,
    open: &'static str,
    close: &'static str,
) -> Option<Vec<Token>> {
    let mut depth = 0usize;
    for (j, token) in tokens.iter().enumerate().skip(open_at) {
        if *token == Token::Punct(open) {
            depth += 1;
        } else if *token == Token::Punct(close) {
            depth -= 1;
            if depth == 0 {
                return Some(tokens[open_at + 1..j].to_vec());
            }
        }
    }
    None
}

/// Splits on commas that are not nested inside parentheses or braces.
fn split_top_level_commas(tokens: &[Token]) -> Vec<Vec<Token>> {
    let mut fields = vec![Vec::new()];
    let mut depth = 0usize;
    for token in tokens {
        match token {
            Token::Punct("(" | "{") => depth += 1,
            Token::Punct(")" | "}") => depth = depth.saturating_sub(1),
            Token::Punct(",") if depth == 0 => {
                fields.push(Vec::new());
                continue;
            }
            _ => {}
        }
        if let Some(last) = fields.last_mut() {
            last.push(token.clone());
        }
    }
    fields
}
