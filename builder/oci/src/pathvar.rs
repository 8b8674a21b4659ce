//! PATH as an image's runtime sees it: the default for images that set
//! none, and a program looked up through it as `execvp` does.

/// The PATH a command gets when the image sets none (Docker's and BuildKit's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The PATH an image's environment (`NAME=value` items) gives, else the default.
pub fn of_env(env: &[String]) -> &str {
    env.iter().find_map(|e| e.strip_prefix("PATH=")).unwrap_or(DEFAULT_PATH)
}

/// `name` found through `path`: a name with a `/` is taken as it is; else
/// the first `DIR/name` of PATH's non-empty entries, in order, that
/// `is_program` accepts (the caller knows where the image's files are).
/// A trailing `/` of an entry is dropped (`/opt/bin/` gives `/opt/bin/x`),
/// as runc's lookup does, so the local sandbox executes the same path the
/// Docker engine would (a shebang script sees it as `$0`).
pub fn lookup(name: &str, path: &str, is_program: impl Fn(&str) -> bool) -> Option<String> {
    if name.contains('/') {
        return Some(name.to_string());
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| format!("{}/{name}", d.trim_end_matches('/')))
        .find(|p| is_program(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_found_in_path_order() {
        let env = vec!["HOME=/root".to_string(), "PATH=/opt/bin/::/usr/bin".to_string()];
        assert_eq!(of_env(&env), "/opt/bin/::/usr/bin");
        assert_eq!(of_env(&[]), DEFAULT_PATH);
        let has = |p: &str| p == "/usr/bin/sh" || p == "/opt/bin/tool";
        assert_eq!(lookup("sh", of_env(&env), has).as_deref(), Some("/usr/bin/sh"));
        assert_eq!(lookup("tool", of_env(&env), has).as_deref(), Some("/opt/bin/tool"));
        assert_eq!(lookup("nope", of_env(&env), has), None);
        assert_eq!(lookup("./x", of_env(&env), has).as_deref(), Some("./x"));
        assert_eq!(lookup("sh", DEFAULT_PATH, |p| p == "/bin/sh").as_deref(), Some("/bin/sh"));
    }
}
