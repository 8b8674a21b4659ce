//! Recipe arguments: `[args]` declares names with defaults, `--arg NAME=VALUE`
//! and `--arg-file FILE` set them, and `${NAME}` in a string value is replaced
//! by the value before the value is checked.
//!
//! Only `${NAME}` is special, NAME alone in the braces: `$HOME`, `$$`,
//! `${VAR:-x}` or `${10}` reach the value as written (so a shell command keeps
//! its own expansions), and `$${` is a literal `${`.
//! Substitution happens once, before any check, so a value reaches a step's
//! cache key only through the fields it appears in.

use std::collections::BTreeMap;
use std::path::Path;

/// One argument as the recipe resolved it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arg {
    pub name: String,
    pub value: String,
    /// Where the value came from: `default`, `--arg` or `FILE:LINE`.
    pub origin: String,
}

/// A value given on the command line, to be matched against `[args]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgValue {
    pub name: String,
    pub value: String,
    /// `--arg` or `FILE:LINE` (for messages and `kiln plan`).
    pub origin: String,
}

/// The most bytes an `--arg-file` may hold.
const MAX_ARG_FILE: u64 = 1 << 20;

/// An argument's name: a letter or `_`, then letters, digits and `_`.
pub fn is_arg_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// `--arg NAME=VALUE`. The error names the problem, never echoing the value.
pub fn parse_arg(s: &str) -> Result<ArgValue, String> {
    let Some((name, value)) = s.split_once('=') else {
        return Err("`--arg` takes NAME=VALUE".into());
    };
    if !is_arg_name(name) {
        return Err(format!(
            "`{}` is not an argument name (a letter or `_`, then letters, digits and `_`)",
            name.escape_debug()
        ));
    }
    Ok(ArgValue { name: name.into(), value: value.into(), origin: "--arg".into() })
}

/// `--arg-file FILE`: one `NAME=VALUE` per line, as Docker's `--env-file`:
/// the value is the rest of the line, unquoted; blank lines and lines starting
/// with `#` are skipped; a final `\r` is dropped. Errors name the file and
/// line, never the line's bytes.
pub fn read_arg_file(path: &Path) -> Result<Vec<ArgValue>, String> {
    let shown = path.display();
    let bytes = read_plain_file(path, MAX_ARG_FILE)
        .map_err(|e| format!("cannot read the argument file {shown}: {e}"))?;
    let mut out = Vec::new();
    for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
        let at = format!("{shown}:{}", i + 1);
        let line = std::str::from_utf8(line).map_err(|_| format!("{at}: the line is not UTF-8 text"))?;
        if line.contains('\0') {
            return Err(format!("{at}: the line holds a NUL byte (an argument file is text)"));
        }
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let Some((name, value)) = line.split_once('=') else {
            return Err(format!("{at}: the line is not NAME=VALUE"));
        };
        if !is_arg_name(name) {
            return Err(format!(
                "{at}: the name before `=` is not an argument name (a letter or `_`, then letters, digits and `_`)"
            ));
        }
        out.push(ArgValue { name: name.into(), value: value.into(), origin: at });
    }
    Ok(out)
}

/// The bytes of a regular file the command line named, which may come from a
/// pull request: reached through no symlink (a link could point at
/// `/proc/self/environ` or a secret of the runner), not on procfs or sysfs,
/// never blocking on a fifo, at most `max` bytes. The recipe is read so too.
pub(crate) fn read_plain_file(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use rustix::fs::{Mode, OFlags, ResolveFlags, CWD};
    use std::io::Read;
    const PROC_SUPER_MAGIC: i64 = 0x9fa0;
    const SYSFS_MAGIC: i64 = 0x6265_6572;
    let fd = rustix::fs::openat2(
        CWD,
        path,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| match e {
        rustix::io::Errno::LOOP | rustix::io::Errno::XDEV => {
            std::io::Error::other("its path goes through a symlink, which kiln does not follow here")
        }
        e => e.into(),
    })?;
    let st = rustix::fs::fstat(&fd)?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(std::io::Error::other("it is not a regular file"));
    }
    let fs_type = rustix::fs::fstatfs(&fd)?.f_type as i64;
    if fs_type == PROC_SUPER_MAGIC || fs_type == SYSFS_MAGIC {
        return Err(std::io::Error::other("it is a file of the kernel's, not a file of arguments"));
    }
    if st.st_size as u64 > max {
        return Err(std::io::Error::other(format!("it is larger than {} MiB", max >> 20)));
    }
    rustix::fs::fcntl_setfl(&fd, OFlags::empty())?;
    let mut bytes = Vec::new();
    std::fs::File::from(fd).take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::other(format!("it is larger than {} MiB", max >> 20)));
    }
    Ok(bytes)
}

/// Why a string could not be expanded, with the byte range in the string.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ExpandError {
    pub(crate) at: std::ops::Range<usize>,
    pub(crate) message: String,
    pub(crate) hint: String,
}

/// `${NAME}` at the start of `s`: the name, and the text after the `}`. Any
/// other `${...}` (`${VAR:-x}`, `${#VAR}`, `${10}`) is not a reference.
fn reference(s: &str) -> Option<(&str, &str)> {
    let body = s.strip_prefix("${")?;
    let end = body.find('}')?;
    let name = &body[..end];
    is_arg_name(name).then(|| (name, &body[end + 1..]))
}

/// Replaces each `${NAME}` in `s` with its value in `args`; `$${` is a literal
/// `${`; any other `$` is kept as written.
pub(crate) fn expand(s: &str, args: &BTreeMap<String, String>) -> Result<Option<String>, ExpandError> {
    if !s.contains("${") {
        return Ok(None);
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    let mut pos = 0;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
            pos += i + 3;
        } else if let Some((name, after)) = reference(tail) {
            let Some(v) = args.get(name) else {
                return Err(ExpandError {
                    at: pos + i..pos + i + 3 + name.len(),
                    message: format!("`{name}` is not declared in `[args]`"),
                    hint: format!("declare it with a default: `[args]` then `{name} = \"...\"`; or write `$${{{name}}}` for a literal `${{{name}}}` (e.g. a shell variable)"),
                });
            };
            out.push_str(v);
            rest = after;
            pos += i + 3 + name.len();
        } else {
            out.push('$');
            rest = &tail[1..];
            pos += i + 1;
        }
    }
    out.push_str(rest);
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> BTreeMap<String, String> {
        [("V".to_string(), "1.2".to_string()), ("_x9".to_string(), "".to_string())].into()
    }

    #[test]
    fn expands_references_and_keeps_other_dollars() {
        let a = args();
        assert_eq!(expand("plain", &a), Ok(None));
        assert_eq!(expand("$HOME $$ $1 $", &a), Ok(None));
        assert_eq!(expand("v${V}-${_x9}!", &a).unwrap().as_deref(), Some("v1.2-!"));
        assert_eq!(expand("$${V} ${V}", &a).unwrap().as_deref(), Some("${V} 1.2"));
        assert_eq!(expand("$$${V}", &a).unwrap().as_deref(), Some("$${V}"));
        assert_eq!(expand("echo $$ ${V}$", &a).unwrap().as_deref(), Some("echo $$ 1.2$"));
        // A value is not expanded again.
        let b: BTreeMap<String, String> = [("A".to_string(), "${B}".to_string())].into();
        assert_eq!(expand("${A}", &b).unwrap().as_deref(), Some("${B}"));
    }

    #[test]
    fn shell_expansions_are_not_references() {
        let a = args();
        for s in ["${V:-x}", "${#V}", "${10}", "${V%/*}", "${}", "${ V}", "${V", "a ${V:?unset} b"] {
            assert_eq!(expand(s, &a).unwrap().as_deref(), Some(s), "{s}");
        }
        assert_eq!(expand("${V:-x} ${V}", &a).unwrap().as_deref(), Some("${V:-x} 1.2"));
    }

    #[test]
    fn undeclared_references_point_at_themselves() {
        let a = args();
        let e = expand("ab ${NOPE} c", &a).unwrap_err();
        assert_eq!(e.at, 3..10);
        assert!(e.message.contains("`NOPE` is not declared"), "{}", e.message);
        let e = expand("é ${:-} ${HOME}", &a).unwrap_err();
        assert_eq!(e.at, 9..16);
    }

    #[test]
    fn command_line_values() {
        assert_eq!(parse_arg("A=b=c").unwrap().value, "b=c");
        assert_eq!(parse_arg("A=").unwrap().value, "");
        assert!(parse_arg("A").is_err());
        assert!(parse_arg("1A=x").is_err());
        assert!(parse_arg("=x").is_err());
        assert!(!is_arg_name(&"a".repeat(129)));
    }

    #[test]
    fn argument_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("args");
        std::fs::write(&f, "# comment\n\nA=1\r\n  # indented comment\nB= spaced value \nC=x=y").unwrap();
        let v = read_arg_file(&f).unwrap();
        let got: Vec<_> = v.iter().map(|a| (a.name.as_str(), a.value.as_str())).collect();
        assert_eq!(got, [("A", "1"), ("B", " spaced value "), ("C", "x=y")]);
        assert!(v[0].origin.ends_with("args:3"), "{}", v[0].origin);

        std::fs::write(&f, "A=1\nSECRET-TOKEN\n").unwrap();
        let e = read_arg_file(&f).unwrap_err();
        assert!(e.ends_with("args:2: the line is not NAME=VALUE"), "{e}");
        assert!(!e.contains("SECRET"), "the line's bytes are not echoed: {e}");
        std::fs::write(&f, "bad name=hunter2\n").unwrap();
        let e = read_arg_file(&f).unwrap_err();
        assert!(!e.contains("hunter2") && !e.contains("bad name"), "{e}");
        std::fs::write(&f, b"A=\xff\n").unwrap();
        assert!(read_arg_file(&f).unwrap_err().contains("args:1: the line is not UTF-8"));
        assert!(read_arg_file(dir.path()).unwrap_err().contains("not a regular file"));
        assert!(read_arg_file(&dir.path().join("missing")).unwrap_err().contains("cannot read"));
        // Hostile: a link to the process's environment, through a file or a folder; procfs itself; NUL.
        let link = dir.path().join("env.args");
        std::os::unix::fs::symlink("/proc/self/environ", &link).unwrap();
        assert!(read_arg_file(&link).unwrap_err().contains("through a symlink"));
        std::os::unix::fs::symlink("/proc/self", dir.path().join("self")).unwrap();
        assert!(read_arg_file(&dir.path().join("self/environ")).unwrap_err().contains("through a symlink"));
        assert!(read_arg_file(Path::new("/proc/self/environ")).unwrap_err().contains("through a symlink"));
        let environ = format!("/proc/{}/environ", std::process::id());
        assert!(read_arg_file(Path::new(&environ)).unwrap_err().contains("kernel's"));
        std::fs::write(&f, b"A=1\0B=2\n").unwrap();
        assert!(read_arg_file(&f).unwrap_err().contains("args:1: the line holds a NUL byte"));
        assert!(read_arg_file(&dir.path().join("missing")).unwrap_err().contains("cannot read"));
    }
}
