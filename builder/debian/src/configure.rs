//! The packages' maintainer scripts, as dpkg runs them on a fresh install:
//! every `preinst install`, then every `postinst configure`, in dependency
//! order, then each package's triggers once, with the environment dpkg
//! gives (`DPKG_MAINTSCRIPT_*`, `DEBIAN_FRONTEND=noninteractive`, a
//! `policy-rc.d` that refuses service starts, `SOURCE_DATE_EPOCH`).
//!
//! This module writes the driver, a POSIX shell script that the build runs
//! in its sandbox (any backend) on top of the packages' layer; what the
//! scripts change becomes the next layer. The driver ends by removing what
//! would differ between two builds (logs, `*-old` backups, ldconfig's
//! aux-cache, generated host keys and machine ids), as Debian's own image
//! builder (debuerreotype) does, so the layer is reproducible.

use std::collections::{BTreeMap, BTreeSet};

use super::deb822::{self, Paragraph};
use super::lockfile::PackageLock;
use crate::error::BuildError;

/// Bump when the order of the scripts changes (the driver's text is in
/// [`fingerprint`] already).
const SCHEMA: u32 = 3;

/// What the step's key takes from the driver: its schema, the packages
/// run first, and the driver's shell text, so a change to any of them
/// never reuses an old layer.
pub fn fingerprint() -> String {
    let mut text = format!("{SCHEMA} {FIRST:?}\n");
    text.push_str(&script(&[]));
    kiln_cache::Digest::of(text.as_bytes()).to_string()
}

/// The maintainer scripts kiln keeps in `/var/lib/dpkg/info` beside the
/// `.list`, as dpkg does (`prerm`/`postrm` for a later `dpkg -r`).
pub(crate) const CONTROL_MEMBERS: &[&str] =
    &["preinst", "postinst", "prerm", "postrm", "config", "templates", "triggers", "shlibs", "symbols"];

/// The command the build runs.
#[derive(Debug, Clone)]
pub struct Driver {
    pub argv: Vec<String>,
    /// Packages in the order their scripts run (dpkg's info names).
    pub order: Vec<String>,
}

/// The environment every script gets, on top of the image's, as dpkg and
/// apt give it; `SOURCE_DATE_EPOCH` makes stamped outputs reproducible.
pub fn environment(lock: &PackageLock, epoch: u64) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = [
        ("DEBIAN_FRONTEND", "noninteractive"),
        ("DEBCONF_NONINTERACTIVE_SEEN", "true"),
        ("DPKG_ADMINDIR", "/var/lib/dpkg"),
        ("DPKG_ROOT", ""),
        ("HOME", "/root"),
        ("LC_ALL", "C.UTF-8"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    env.insert("SOURCE_DATE_EPOCH".into(), epoch.to_string());
    if let Some(dpkg) = lock.packages.iter().find(|p| p.name == "dpkg") {
        env.insert("DPKG_RUNNING_VERSION".into(), dpkg.version.clone());
    }
    env
}

/// The driver for the packages of `lock`, whose control paragraphs are in
/// `status` (the packages' layer's `/var/lib/dpkg/status`).
pub fn driver(status: &str, lock: &PackageLock) -> Result<Driver, BuildError> {
    let paragraphs = deb822::parse(status).map_err(|e| BuildError::BadImage {
        image: "the packages' layer".into(),
        reason: format!("its /var/lib/dpkg/status is malformed: {e}"),
    })?;
    let ours: BTreeSet<&str> = lock.packages.iter().map(|p| p.name.as_str()).collect();
    let mine: Vec<&Paragraph> =
        paragraphs.iter().filter(|p| p.get("Package").is_some_and(|n| ours.contains(n))).collect();
    let order = dependency_order(&mine);
    let script = script(&order);
    Ok(Driver {
        argv: vec!["/bin/sh".into(), "-c".into(), script, "kiln-maintainer-scripts".into()],
        order: order.into_iter().map(|(info, _, _)| info).collect(),
    })
}

/// The packages whose scripts run first, as debootstrap installs them.
const FIRST: &[&str] = &["base-passwd", "base-files"];

/// (info name, package, architecture) of each package, dependencies
/// first (after [`FIRST`]); a cycle is broken at the name that sorts first, so the order is
/// the same on every machine.
fn dependency_order(paragraphs: &[&Paragraph]) -> Vec<(String, String, String)> {
    // Who answers a name: the package itself or a package providing it.
    let mut answers: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for p in paragraphs {
        let name = p.get("Package").unwrap_or_default();
        answers.entry(name.to_string()).or_default().push(name);
    }
    for p in paragraphs {
        let name = p.get("Package").unwrap_or_default();
        for clause in deb822::parse_relations(p.get("Provides").unwrap_or_default()).unwrap_or_default() {
            for d in clause {
                answers.entry(d.name).or_default().push(name);
            }
        }
    }
    let mut deps: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for p in paragraphs {
        let name = p.get("Package").unwrap_or_default();
        let mut mine = Vec::new();
        for field in ["Pre-Depends", "Depends"] {
            for clause in deb822::parse_relations(p.get(field).unwrap_or_default()).unwrap_or_default() {
                // The first alternative that is installed, as apt chose.
                if let Some(target) =
                    clause.iter().find_map(|d| answers.get(d.name.as_str()).and_then(|v| v.first()))
                {
                    if *target != name {
                        mine.push(*target);
                    }
                }
            }
        }
        deps.insert(name, mine);
    }
    let by_name: BTreeMap<&str, &Paragraph> =
        paragraphs.iter().map(|p| (p.get("Package").unwrap_or_default(), *p)).collect();
    let mut out = Vec::new();
    let mut state: BTreeMap<&str, bool> = BTreeMap::new(); // false: visiting, true: done
    fn visit<'a>(
        n: &'a str,
        deps: &BTreeMap<&'a str, Vec<&'a str>>,
        state: &mut BTreeMap<&'a str, bool>,
        out: &mut Vec<&'a str>,
    ) {
        if state.contains_key(n) {
            return; // done, or a cycle: broken here
        }
        state.insert(n, false);
        for d in deps.get(n).map(|v| v.as_slice()).unwrap_or_default() {
            visit(d, deps, state, out);
        }
        state.insert(n, true);
        out.push(n);
    }
    let mut names: Vec<&str> = Vec::new();
    // As debootstrap: the users and groups, and the base layout, before
    // anything (debconf looks up root's home; adduser needs the groups).
    // Their files are all unpacked already, so (as debootstrap's
    // `--force-depends`) they go before their own dependencies.
    for n in FIRST.iter().filter(|n| by_name.contains_key(*n)) {
        state.insert(n, true);
        names.push(n);
    }
    for n in by_name.keys() {
        visit(n, &deps, &mut state, &mut names);
    }
    for n in names {
        let p = by_name[n];
        let arch = p.get("Architecture").unwrap_or_default().to_string();
        let info = if p.get("Multi-Arch") == Some("same") { format!("{n}:{arch}") } else { n.to_string() };
        out.push((info, n.to_string(), arch));
    }
    out
}

/// Quotes a word for the shell (package names and architectures are
/// already checked to be plain; this keeps the script safe regardless).
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// How the driver's last line starts when a script fails; `failed` reads it.
const FAILED: &str = "kiln: maintainer script failed:";

fn script(order: &[(String, String, String)]) -> String {
    let mut s = String::from(
        &r#"set -u
info=/var/lib/dpkg/info
# Services are never started at build time (as in debootstrap and mmdebstrap).
mkdir -p /usr/sbin
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
chmod 755 /usr/sbin/policy-rc.d
# run INFO PACKAGE ARCH SCRIPT ARGS...: one maintainer script, as dpkg runs it.
run() {
    f="$info/$1.$4"
    [ -f "$f" ] || return 0
    [ -x "$f" ] || chmod 755 "$f"
    DPKG_MAINTSCRIPT_PACKAGE="$2" DPKG_MAINTSCRIPT_ARCH="$3" DPKG_MAINTSCRIPT_NAME="$4" \
        DPKG_MAINTSCRIPT_PACKAGE_REFCOUNT=1 "$f" "$5" ${6:+"$6"} </dev/null
    rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "@FAILED@ $1 $4 $5 $rc" >&2
        exit "$rc"
    fi
}
# triggers INFO PACKAGE ARCH: the package's trigger interests, each once
# (file triggers whose path exists, named triggers always).
triggers() {
    [ -f "$info/$1.triggers" ] || return 0
    names=""
    while read -r kw name rest; do
        case "$kw" in
            interest|interest-await|interest-noawait)
                case "$name" in
                    /*) [ -e "$name" ] || continue ;;
                esac
                names="$names $name" ;;
        esac
    done < "$info/$1.triggers"
    [ -n "$names" ] || return 0
    run "$1" "$2" "$3" postinst triggered "${names# }"
}
"#
        .replace("@FAILED@", FAILED),
    );
    // The packages of FIRST (at the head of `order`) are installed whole,
    // preinst and postinst, before the others, as debootstrap does; then
    // every preinst, every postinst, every package's triggers.
    let first = order.iter().take_while(|(_, name, _)| FIRST.contains(&name.as_str())).count();
    let (head, rest) = order.split_at(first);
    let who = |(info, name, arch): &(String, String, String)| {
        format!("{} {} {}", quote(info), quote(name), quote(arch))
    };
    for phase in [
        (
            "the users, groups and base layout first, whole",
            head,
            &["run {} preinst install", "run {} postinst configure"][..],
        ),
        ("preinst install, dependencies first", rest, &["run {} preinst install"][..]),
        ("postinst configure, dependencies first", rest, &["run {} postinst configure"][..]),
        ("each package's triggers, once", order, &["triggers {}"][..]),
    ] {
        let (what, list, calls) = phase;
        s.push_str(&format!("# {what}\n"));
        for p in list {
            for call in calls {
                s.push_str(&call.replace("{}", &who(p)));
                s.push('\n');
            }
        }
    }
    s.push_str(
        r#"# What would differ between two builds, removed as debuerreotype does.
rm -f /usr/sbin/policy-rc.d
rm -f /var/log/dpkg.log /var/log/alternatives.log /var/log/bootstrap.log /var/log/apt/history.log /var/log/apt/term.log
rm -f /var/cache/ldconfig/aux-cache
rm -f /etc/passwd- /etc/group- /etc/shadow- /etc/gshadow- /etc/subuid- /etc/subgid-
rm -f /var/cache/debconf/*-old /var/lib/dpkg/*-old
rm -f /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub
rm -f /etc/ssl/private/ssl-cert-snakeoil.key /etc/ssl/certs/ssl-cert-snakeoil.pem
for l in /etc/ssl/certs/*; do [ -L "$l" ] && [ ! -e "$l" ] && rm -f "$l"; done
rm -f /var/lib/dbus/machine-id
if [ -e /etc/machine-id ]; then : > /etc/machine-id; fi
rm -rf /tmp/* /var/tmp/*
exit 0
"#,
    );
    s
}

/// The script a failed driver names in its output's `tail`, as the
/// command dpkg would have run (`/var/lib/dpkg/info/nginx-common.postinst
/// configure`), when it is a package of `order`; `None` when the driver
/// failed elsewhere. Only kiln's own names are returned, never bytes of
/// the output: a script that prints a look-alike line can at most blame
/// another package of the set.
pub fn failed(tail: &[String], order: &[String]) -> Option<String> {
    let line = tail.iter().rev().find_map(|l| l.strip_prefix(FAILED))?;
    let mut w = line.split_whitespace();
    let (info, script, arg) = (w.next()?, w.next()?, w.next()?);
    let info = order.iter().find(|o| o.as_str() == info)?;
    let script = ["preinst", "postinst"].into_iter().find(|s| *s == script)?;
    let arg = ["install", "configure", "triggered"].into_iter().find(|a| *a == arg)?;
    Some(format!("/var/lib/dpkg/info/{info}.{script} {arg}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paragraphs(text: &str) -> Vec<Paragraph> {
        deb822::parse(text).unwrap()
    }

    #[test]
    fn dependencies_come_first_and_cycles_break_the_same_way() {
        let ps = paragraphs(
            "Package: app\nArchitecture: amd64\nDepends: libx (>= 1), awk | gawk\nPre-Depends: base\n\nPackage: libx\nArchitecture: amd64\nMulti-Arch: same\nDepends: base\n\nPackage: mawk\nArchitecture: amd64\nProvides: awk\n\nPackage: base\nArchitecture: all\n\nPackage: a\nArchitecture: all\nDepends: b\n\nPackage: b\nArchitecture: all\nDepends: a\n",
        );
        let refs: Vec<&Paragraph> = ps.iter().collect();
        let order: Vec<String> = dependency_order(&refs).into_iter().map(|o| o.0).collect();
        let pos = |n: &str| order.iter().position(|o| o == n).unwrap();
        assert!(pos("base") < pos("libx:amd64") && pos("libx:amd64") < pos("app"), "{order:?}");
        assert!(pos("mawk") < pos("app"), "a provider counts: {order:?}");
        assert_eq!(order.len(), 6);
        // The cycle a <-> b: broken at `a` (visited first), so b is configured first.
        assert!(pos("b") < pos("a"), "{order:?}");

        let mut rev = refs.clone();
        rev.reverse();
        let again: Vec<String> = dependency_order(&rev).into_iter().map(|o| o.0).collect();
        assert_eq!(order, again, "the order does not depend on the status file's order");
        // base-passwd first, before its own dependencies, as debootstrap.
        let ps = paragraphs("Package: adduser\nArchitecture: all\n\nPackage: base-passwd\nArchitecture: amd64\nDepends: libc6\n\nPackage: libc6\nArchitecture: amd64\n");
        let refs: Vec<&Paragraph> = ps.iter().collect();
        let order: Vec<String> = dependency_order(&refs).into_iter().map(|o| o.0).collect();
        assert_eq!(order, ["base-passwd", "adduser", "libc6"]);
    }

    #[test]
    fn a_failure_is_named_only_with_kiln_s_own_names() {
        let order = vec!["nginx-common".to_string(), "libc6:amd64".to_string()];
        let tail = vec![
            "some output".into(),
            "kiln: maintainer script failed: nginx-common postinst configure 3".into(),
        ];
        assert_eq!(
            failed(&tail, &order).as_deref(),
            Some("/var/lib/dpkg/info/nginx-common.postinst configure")
        );
        // A script that prints a look-alike for a package kiln does not know: no name.
        let spoof = vec!["kiln: maintainer script failed: \u{1b}[31mevil postinst configure 1".into()];
        assert_eq!(failed(&spoof, &order), None);
        assert_eq!(failed(&["kiln: maintainer script failed: nginx-common rm -rf 1".into()], &order), None);
        assert_eq!(failed(&[], &order), None);
    }

    #[test]
    fn the_driver_quotes_and_orders() {
        let s = script(&[("it's".into(), "x".into(), "all".into())]);
        assert!(s.contains("run 'it'\\''s' 'x' 'all' preinst install\n"), "{s}");
        let pre = s.find("preinst install").unwrap();
        let post = s.find("postinst configure\n").unwrap();
        assert!(pre < post);
        assert!(s.trim_end().ends_with("exit 0"));
    }
}
