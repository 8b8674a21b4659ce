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
const SCHEMA: u32 = 5;

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
        order: order.into_iter().map(|o| o.info).collect(),
    })
}

/// The packages whose scripts run first, as debootstrap installs them.
const FIRST: &[&str] = &["base-passwd", "base-files"];

/// One package in the order its scripts run.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ordered {
    /// dpkg's info name: `NAME`, or `NAME:ARCH` for `Multi-Arch: same`.
    info: String,
    name: String,
    arch: String,
    group: Group,
}

/// The three groups the driver installs one after the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Group {
    /// [`FIRST`]: whole, before anything (as debootstrap).
    First,
    /// The `Essential: yes` packages and what they depend on (mawk for
    /// base-files' `awk`): scripts of other packages use them undeclared,
    /// as Debian policy allows, so they are configured before those.
    Essential,
    Rest,
}

/// Each package in the order its scripts run: [`FIRST`], then the
/// Essential packages and their dependencies, then the rest; within a
/// group dependencies first, and a cycle broken at the name that sorts
/// first, so the order is the same on every machine.
fn dependency_order(paragraphs: &[&Paragraph]) -> Vec<Ordered> {
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
                                                           // Depth-first, dependencies before dependents, with an explicit stack
                                                           // (a hostile lock's chain of thousands of packages cannot overflow it).
    fn visit<'a>(
        root: &'a str,
        deps: &BTreeMap<&'a str, Vec<&'a str>>,
        state: &mut BTreeMap<&'a str, bool>,
        out: &mut Vec<&'a str>,
    ) {
        if state.contains_key(root) {
            return; // done, or a cycle: broken here
        }
        state.insert(root, false);
        let mut stack: Vec<(&str, usize)> = vec![(root, 0)];
        while let Some((n, i)) = stack.pop() {
            let ds = deps.get(n).map(|v| v.as_slice()).unwrap_or_default();
            if let Some(d) = ds.get(i) {
                stack.push((n, i + 1));
                if !state.contains_key(d) {
                    state.insert(d, false);
                    stack.push((d, 0));
                }
            } else {
                state.insert(n, true);
                out.push(n);
            }
        }
    }
    let mut names: Vec<(&str, Group)> = Vec::new();
    // As debootstrap: the users and groups, and the base layout, before
    // anything (debconf looks up root's home; adduser needs the groups).
    // Their files are all unpacked already, so (as debootstrap's
    // `--force-depends`) they go before their own dependencies.
    for n in FIRST.iter().filter(|n| by_name.contains_key(*n)) {
        state.insert(n, true);
        names.push((n, Group::First));
    }
    for (group, only_essential) in [(Group::Essential, true), (Group::Rest, false)] {
        let mut visited = Vec::new();
        for (n, p) in &by_name {
            if FIRST.contains(n) && only_essential {
                // Done already; what they need is as essential as they are.
                for d in &deps[n] {
                    visit(d, &deps, &mut state, &mut visited);
                }
            } else if !only_essential || p.get("Essential") == Some("yes") {
                visit(n, &deps, &mut state, &mut visited);
            }
        }
        names.extend(visited.into_iter().map(|n| (n, group)));
    }
    for (n, group) in names {
        let p = by_name[n];
        let arch = p.get("Architecture").unwrap_or_default().to_string();
        let info = if p.get("Multi-Arch") == Some("same") { format!("{n}:{arch}") } else { n.to_string() };
        out.push(Ordered { info, name: n.to_string(), arch, group });
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

fn script(order: &[Ordered]) -> String {
    let mut s = String::from(
        &r#"set -u
info=/var/lib/dpkg/info
# Services are never started at build time (as in debootstrap and mmdebstrap).
mkdir -p /usr/sbin
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
chmod 755 /usr/sbin/policy-rc.d
# The scripts run as in debootstrap's chroot: `ischroot` says so (libc6's
# postinst otherwise tries `telinit u` and sleeps a second). The shim lives
# in /tmp, which is emptied below, so it is in no layer.
[ -d /tmp ] || { mkdir -m 1777 /tmp; made_tmp=1; }
mkdir -p /tmp/kiln-shims
printf '#!/bin/sh\nexit 0\n' > /tmp/kiln-shims/ischroot
chmod 755 /tmp/kiln-shims/ischroot
PATH="/tmp/kiln-shims:$PATH"
export PATH
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
    // The packages of FIRST are installed whole, preinst and postinst,
    // before the others, as debootstrap does; then the Essential group's
    // preinsts and postinsts, then the rest's; then every package's triggers.
    let who = |o: &Ordered| format!("{} {} {}", quote(&o.info), quote(&o.name), quote(&o.arch));
    let of = |g: Group| order.iter().filter(move |o| o.group == g);
    let mut put = |what: &str, list: Vec<&Ordered>, calls: &[&str]| {
        s.push_str(&format!("# {what}\n"));
        for o in list {
            for call in calls {
                s.push_str(&call.replace("{}", &who(o)));
                s.push('\n');
            }
        }
    };
    put(
        "the users, groups and base layout first, whole",
        of(Group::First).collect(),
        &["run {} preinst install", "run {} postinst configure"],
    );
    for (g, what) in
        [(Group::Essential, "the Essential packages and what they need"), (Group::Rest, "the others")]
    {
        put(
            &format!("{what}: preinst install, dependencies first"),
            of(g).collect(),
            &["run {} preinst install"],
        );
        put(
            &format!("{what}: postinst configure, dependencies first"),
            of(g).collect(),
            &["run {} postinst configure"],
        );
    }
    put("each package's triggers, once", order.iter().collect(), &["triggers {}"]);
    s.push_str(
        r#"# What would differ between two builds, removed as debuerreotype does.
rm -f /usr/sbin/policy-rc.d
rm -f /var/log/dpkg.log /var/log/alternatives.log /var/log/bootstrap.log /var/log/apt/history.log /var/log/apt/term.log
rm -f /var/cache/ldconfig/aux-cache
rm -f /etc/passwd- /etc/group- /etc/shadow- /etc/gshadow- /etc/subuid- /etc/subgid-
rm -f /var/cache/debconf/*-old /var/lib/dpkg/*-old
# Temporary file names debconf keeps in its database (ucf's prompt
# variables) differ on every build: made stable.
if [ -f /var/cache/debconf/config.dat ] && command -v sed >/dev/null; then
    sed -i -E 's#^( [A-Za-z0-9_]+ = )(/tmp|/var/tmp)/[^[:space:]]+$#\1\2/kiln-tmp#' /var/cache/debconf/config.dat
fi
rm -f /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub
rm -f /etc/ssl/private/ssl-cert-snakeoil.key /etc/ssl/certs/ssl-cert-snakeoil.pem
for l in /etc/ssl/certs/*; do [ -L "$l" ] && [ ! -e "$l" ] && rm -f "$l"; done
rm -f /var/lib/dbus/machine-id
if [ -e /etc/machine-id ]; then : > /etc/machine-id; fi
rm -rf /tmp/* /var/tmp/*
if [ -n "${made_tmp:-}" ]; then rmdir /tmp; fi
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
        let order: Vec<String> = dependency_order(&refs).into_iter().map(|o| o.info).collect();
        let pos = |n: &str| order.iter().position(|o| o == n).unwrap();
        assert!(pos("base") < pos("libx:amd64") && pos("libx:amd64") < pos("app"), "{order:?}");
        assert!(pos("mawk") < pos("app"), "a provider counts: {order:?}");
        assert_eq!(order.len(), 6);
        // The cycle a <-> b: broken at `a` (visited first), so b is configured first.
        assert!(pos("b") < pos("a"), "{order:?}");

        let mut rev = refs.clone();
        rev.reverse();
        let again: Vec<String> = dependency_order(&rev).into_iter().map(|o| o.info).collect();
        assert_eq!(order, again, "the order does not depend on the status file's order");
        // A chain of 100,000 packages: no stack overflow.
        let chain: String = (0..100_000)
            .map(|i| format!("Package: p{i}\nArchitecture: all\nDepends: p{}\n\n", i + 1))
            .collect();
        let ps = paragraphs(&chain);
        let refs: Vec<&Paragraph> = ps.iter().collect();
        let order = dependency_order(&refs);
        assert_eq!((order.len(), order[0].info.as_str()), (100_000, "p99999"));
        // base-passwd first, before its own dependencies, as debootstrap.
        let ps = paragraphs("Package: adduser\nArchitecture: all\n\nPackage: base-passwd\nArchitecture: amd64\nDepends: libc6\n\nPackage: libc6\nArchitecture: amd64\n");
        let refs: Vec<&Paragraph> = ps.iter().collect();
        let order: Vec<String> = dependency_order(&refs).into_iter().map(|o| o.info).collect();
        assert_eq!(
            order,
            ["base-passwd", "libc6", "adduser"],
            "what base-passwd needs comes with the Essential group"
        );
        // Essential packages and what they need (mawk, for base-files' awk)
        // before the others, whatever the names.
        let ps = paragraphs("Package: a-user-of-awk\nArchitecture: all\n\nPackage: base-files\nArchitecture: amd64\nEssential: yes\nPre-Depends: awk\n\nPackage: mawk\nArchitecture: amd64\nProvides: awk\n\nPackage: sed\nArchitecture: amd64\nEssential: yes\n");
        let refs: Vec<&Paragraph> = ps.iter().collect();
        let order = dependency_order(&refs);
        let got: Vec<(&str, Group)> = order.iter().map(|o| (o.info.as_str(), o.group)).collect();
        assert_eq!(
            got,
            [
                ("base-files", Group::First),
                ("mawk", Group::Essential),
                ("sed", Group::Essential),
                ("a-user-of-awk", Group::Rest)
            ]
        );
        let s = script(&order);
        let configure =
            |n: &str| s.find(&format!("run '{n}' '{n}' 'amd64' postinst configure")).unwrap_or(usize::MAX);
        assert!(
            configure("mawk") < s.find("run 'a-user-of-awk' 'a-user-of-awk' 'all' preinst install").unwrap()
        );
        assert!(configure("base-files") < configure("mawk"));
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
        let s = script(&[Ordered {
            info: "it's".into(),
            name: "x".into(),
            arch: "all".into(),
            group: Group::Rest,
        }]);
        assert!(s.contains("run 'it'\\''s' 'x' 'all' preinst install\n"), "{s}");
        let pre = s.find("preinst install").unwrap();
        let post = s.find("postinst configure\n").unwrap();
        assert!(pre < post);
        assert!(s.trim_end().ends_with("exit 0"));
    }
}
