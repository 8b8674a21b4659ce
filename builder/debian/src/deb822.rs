//! Debian's control-file format (deb822), version ordering and relation
//! fields, as dpkg defines them (deb-control(5), deb-version(7)).

use std::cmp::Ordering;

/// One paragraph: fields in file order, with continuation lines joined by `\n`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Paragraph {
    pub(crate) fields: Vec<(String, String)>,
}

impl Paragraph {
    /// The value of `name` (field names are case-insensitive).
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.fields.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The paragraph as deb822 text, ending with a newline.
    pub(crate) fn render(&self) -> String {
        let mut s = String::new();
        for (k, v) in &self.fields {
            s.push_str(k);
            s.push(':');
            for (i, line) in v.split('\n').enumerate() {
                if i == 0 {
                    if !line.is_empty() {
                        s.push(' ');
                        s.push_str(line);
                    }
                } else {
                    s.push_str("\n ");
                    s.push_str(line);
                }
            }
            s.push('\n');
        }
        s
    }
}

/// A line of deb822 input that is not a field, a continuation or a blank line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SyntaxError {
    pub(crate) line: usize,
    pub(crate) text: String,
}

impl std::fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: `{}` is not a `Field: value` line", self.line, self.text)
    }
}

/// Every paragraph of `text`. `#` comment lines are skipped.
pub(crate) fn parse(text: &str) -> Result<Vec<Paragraph>, SyntaxError> {
    let mut out = Vec::new();
    let mut cur = Paragraph::default();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            if !cur.fields.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        if line.starts_with(' ') || line.starts_with('\t') {
            let Some((_, v)) = cur.fields.last_mut() else {
                return Err(SyntaxError { line: i + 1, text: line.to_string() });
            };
            v.push('\n');
            v.push_str(&line[1..]);
            continue;
        }
        let Some((k, v)) = line.split_once(':') else {
            return Err(SyntaxError { line: i + 1, text: line.to_string() });
        };
        cur.fields.push((k.trim().to_string(), v.trim().to_string()));
    }
    if !cur.fields.is_empty() {
        out.push(cur);
    }
    Ok(out)
}

/// Compares two Debian versions as dpkg does: epoch, then upstream version,
/// then revision, each with dpkg's rules (`~` sorts before everything).
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let (ea, ua, ra) = split_version(a);
    let (eb, ub, rb) = split_version(b);
    ea.cmp(&eb).then_with(|| compare_part(ua, ub)).then_with(|| compare_part(ra, rb))
}

fn split_version(v: &str) -> (u64, &str, &str) {
    let (epoch, rest) = match v.split_once(':') {
        Some((e, r)) if e.bytes().all(|b| b.is_ascii_digit()) => (e.parse().unwrap_or(0), r),
        _ => (0, v),
    };
    match rest.rsplit_once('-') {
        Some((u, r)) => (epoch, u, r),
        None => (epoch, rest, ""),
    }
}

fn order(c: u8) -> i32 {
    match c {
        b'~' => -1,
        c if c.is_ascii_alphabetic() => c as i32,
        0 => 0,
        c => c as i32 + 256,
    }
}

fn compare_part(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        // The non-digit prefix, compared with dpkg's character order.
        loop {
            let ca = a.get(i).copied().filter(|c| !c.is_ascii_digit());
            let cb = b.get(j).copied().filter(|c| !c.is_ascii_digit());
            if ca.is_none() && cb.is_none() {
                break;
            }
            let (oa, ob) = (order(ca.unwrap_or(0)), order(cb.unwrap_or(0)));
            if oa != ob {
                return oa.cmp(&ob);
            }
            i += ca.is_some() as usize;
            j += cb.is_some() as usize;
        }
        // The digit run, compared as a number.
        while a.get(i) == Some(&b'0') {
            i += 1;
        }
        while b.get(j) == Some(&b'0') {
            j += 1;
        }
        let si = i;
        while a.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        let sj = j;
        while b.get(j).is_some_and(u8::is_ascii_digit) {
            j += 1;
        }
        let (da, db) = (&a[si..i], &b[sj..j]);
        let c = da.len().cmp(&db.len()).then_with(|| da.cmp(db));
        if c != Ordering::Equal {
            return c;
        }
    }
    Ordering::Equal
}

/// A version relation of a dependency (`<<`, `<=`, `=`, `>=`, `>>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Lt,
    Le,
    Eq,
    Ge,
    Gt,
}

impl Op {
    fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "<<" => Op::Lt,
            "<=" | "<" => Op::Le,
            "=" => Op::Eq,
            ">=" | ">" => Op::Ge,
            ">>" => Op::Gt,
            _ => return None,
        })
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Op::Lt => "<<",
            Op::Le => "<=",
            Op::Eq => "=",
            Op::Ge => ">=",
            Op::Gt => ">>",
        }
    }

    /// Whether `version` satisfies `self against`.
    pub(crate) fn matches(self, version: &str, against: &str) -> bool {
        let c = compare_versions(version, against);
        match self {
            Op::Lt => c == Ordering::Less,
            Op::Le => c != Ordering::Greater,
            Op::Eq => c == Ordering::Equal,
            Op::Ge => c != Ordering::Less,
            Op::Gt => c == Ordering::Greater,
        }
    }
}

/// One alternative of a relation: `name[:arch] [(op version)]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Dep {
    pub(crate) name: String,
    /// An architecture qualifier such as `any` or `native`, if written.
    pub(crate) arch: Option<String>,
    pub(crate) version: Option<(Op, String)>,
}

impl std::fmt::Display for Dep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.name)?;
        if let Some(a) = &self.arch {
            write!(f, ":{a}")?;
        }
        if let Some((op, v)) = &self.version {
            write!(f, " ({} {v})", op.as_str())?;
        }
        Ok(())
    }
}

/// A word kiln takes from an index or a lockfile into names, versions,
/// file names and messages: a package name, version, architecture or
/// suite, in Debian's characters only, at most 200 of them.
pub(crate) fn is_plain_word(w: &str) -> bool {
    !w.is_empty()
        && w.len() <= 200
        && w.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.' | b'_' | b':' | b'~'))
}

/// A `Filename` relative to a mirror's root: no absolute path, no `..` or
/// empty component, no control character, query or fragment.
pub(crate) fn is_pool_path(f: &str) -> bool {
    !f.starts_with('/')
        && !f.split('/').any(|c| c == ".." || c.is_empty())
        && !f.contains(|c: char| c.is_control() || c == '?' || c == '#')
}

/// A relation field (Depends, Pre-Depends, Conflicts, Provides...): a list of
/// clauses, each a list of alternatives separated by `|`.
pub(crate) fn parse_relations(field: &str) -> Result<Vec<Vec<Dep>>, String> {
    let mut out = Vec::new();
    for clause in field.split(',') {
        let clause = clause.trim();
        if clause.is_empty() {
            continue;
        }
        let mut alts = Vec::new();
        for alt in clause.split('|') {
            alts.push(
                parse_dep(alt.trim()).ok_or_else(|| format!("`{}` is not a valid relation", alt.trim()))?,
            );
        }
        out.push(alts);
    }
    Ok(out)
}

fn parse_dep(s: &str) -> Option<Dep> {
    // Architecture lists (`[amd64]`) and build profiles (`<!nocheck>`) only
    // appear in source packages; a binary index never has them.
    let (head, version) = match s.split_once('(') {
        Some((h, rest)) => {
            let inner = rest.strip_suffix(')')?.trim();
            let split = inner.find(|c: char| !matches!(c, '<' | '>' | '='))?;
            let (op, v) = inner.split_at(split);
            (h.trim(), Some((Op::parse(op.trim())?, v.trim().to_string())))
        }
        None => (s.trim(), None),
    };
    let (name, arch) = match head.split_once(':') {
        Some((n, a)) => (n, Some(a.to_string())),
        None => (head, None),
    };
    if name.is_empty() || name.contains(char::is_whitespace) {
        return None;
    }
    Some(Dep { name: name.to_string(), arch, version })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_as_dpkg_does() {
        let ordered =
            ["1.0~rc1", "1.0", "1.0-1", "1.0-1+b1", "1.0-2", "1.0a", "1.0+dfsg", "1.1", "1.10", "2:0.1"];
        for w in ordered.windows(2) {
            assert_eq!(compare_versions(w[0], w[1]), Ordering::Less, "{} < {}", w[0], w[1]);
            assert_eq!(compare_versions(w[1], w[0]), Ordering::Greater);
        }
        assert_eq!(compare_versions("1.01", "1.1"), Ordering::Equal);
        assert_eq!(compare_versions("0:1.0", "1.0"), Ordering::Equal);
        assert_eq!(compare_versions("1.36.1-9", "1.36.1-10"), Ordering::Less);
        assert_eq!(compare_versions("2.36-9+deb12u10", "2.36-9+deb12u9"), Ordering::Greater);
    }

    #[test]
    fn relations_parse_alternatives_versions_and_qualifiers() {
        let r = parse_relations("libc6 (>= 2.34), awk | mawk, python3:any (<< 3.12), foo(=1)").unwrap();
        assert_eq!(r.len(), 4);
        assert_eq!(r[0][0].version, Some((Op::Ge, "2.34".into())));
        assert_eq!(r[1].len(), 2);
        assert_eq!(r[2][0].arch.as_deref(), Some("any"));
        assert_eq!(r[3][0].version, Some((Op::Eq, "1".into())));
        assert!(parse_relations("libc6 (>= )x").is_err());
    }

    #[test]
    fn paragraphs_keep_continuations_and_render_back() {
        let text = "Package: a\nDescription: short\n long\n .\n more\n\n\nPackage: b\n";
        let ps = parse(text).unwrap();
        assert_eq!(ps.len(), 2);
        assert_eq!(ps[0].get("description"), Some("short\nlong\n.\nmore"));
        assert_eq!(ps[0].render(), "Package: a\nDescription: short\n long\n .\n more\n");
        assert!(parse("Package: a\nnot a field\n").is_err());
    }
}
