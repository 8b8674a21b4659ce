//! Users and groups of an image, from the text of its /etc/passwd and
//! /etc/group: what the sandbox switches to and `-o vm:`'s init runs as.

pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: String,
}

/// `user[:group]`, numeric or by name, against the text of an image's
/// /etc/passwd and /etc/group, as runc looks users up.
pub fn resolve_user_in(spec: &str, passwd: &str, group: &str) -> Result<User, String> {
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let entry = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 7 && (f[0] == u || (u.parse::<u32>().is_ok() && f[2] == u)));
    let uid = match (u.parse::<u32>(), &entry) {
        (Ok(n), _) => n,
        (Err(_), Some(f)) => {
            f[2].parse().map_err(|_| format!("the image's /etc/passwd has a bad uid for `{u}`"))?
        }
        (Err(_), None) => return Err(format!("the user `{u}` is not in the image's /etc/passwd")),
    };
    let gid = match g {
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => group
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() >= 3 && f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| format!("the group `{g}` is not in the image's /etc/group"))?,
        },
        None => entry.as_ref().and_then(|f| f[3].parse().ok()).unwrap_or(0),
    };
    let name = entry.as_ref().map(|f| f[0]);
    let mut groups = vec![gid];
    if let (Some(name), None) = (name, g) {
        for f in group.lines().map(|l| l.split(':').collect::<Vec<_>>()) {
            if f.len() >= 4 && f[3].split(',').any(|m| m == name) {
                if let Ok(n) = f[2].parse::<u32>() {
                    if !groups.contains(&n) {
                        groups.push(n);
                    }
                }
            }
        }
    }
    let home =
        entry.as_ref().map(|f| f[5].to_string()).filter(|h| !h.is_empty()).unwrap_or_else(|| "/".into());
    Ok(User { uid, gid, groups, home })
}
