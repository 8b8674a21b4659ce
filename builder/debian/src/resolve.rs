//! Resolution of `include` over a Debian index with resolvo (a CDCL SAT
//! solver), so alternatives, version constraints, virtual packages and
//! conflicts are decided together, not by a greedy walk.
//!
//! How Debian's relations map onto resolvo:
//! - Each binary package version is a solvable; at most one version per name.
//! - A `Depends`/`Pre-Depends` clause `a (>= 1) | b` is one requirement: the
//!   union of "a at a version >= 1", "b at any version", and, for each
//!   package that `Provides` a or b (with a version that satisfies the
//!   constraint, as dpkg requires), "that provider".
//! - `Conflicts` and `Breaks` are constraints: if the named package (or a
//!   provider of the named virtual package) is installed, it must be at a
//!   version outside the conflict. A package never conflicts with itself.
//! - `exclude`d packages are never installed; a clause naming one is taken as
//!   satisfied (like debootstrap's `--exclude`).
//! - `Recommends` and `Suggests` are not followed, and `Essential: yes`
//!   packages are not added unless something depends on them: the image holds
//!   what was asked for and its dependencies.
//! - Newer versions are tried first; among alternatives, the first listed.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Display;

use resolvo::{
    Candidates, Condition, ConditionId, ConditionalRequirement, DenseIndex, Dependencies, DependencyProvider,
    Interner, KnownDependencies, NameId, Problem, Requirement, SolvableId, Solver, SolverCache, StringId,
    UnsolvableOrCancelled, VersionSetId, VersionSetUnionId,
};

use super::archive::IndexEntry;
use super::deb822::{compare_versions, parse_relations, Dep, Op};

/// A resolution failure, worded for the user.
#[derive(Debug)]
pub(crate) enum ResolveError {
    /// Names in `include` that no package has or provides, with close names.
    Unknown(Vec<(String, Vec<String>)>),
    /// An `include` entry that is not `NAME` or `NAME=VERSION`.
    BadRequest(String),
    /// No set of packages satisfies every constraint.
    Unsatisfiable(String),
}

/// One `include` entry: a name, optionally pinned to a version.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    pub(crate) name: String,
    pub(crate) version: Option<String>,
}

impl Request {
    pub(crate) fn parse(s: &str) -> Result<Request, ResolveError> {
        let (name, version) = match s.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().to_string())),
            None => (s.trim(), None),
        };
        let ok = !name.is_empty()
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b))
            && version.as_ref().is_none_or(|v| !v.is_empty() && !v.contains(char::is_whitespace));
        if !ok {
            return Err(ResolveError::BadRequest(s.to_string()));
        }
        Ok(Request { name: name.to_string(), version })
    }
}

struct VSet {
    name: NameId,
    /// The matching solvables, sorted.
    members: Vec<SolvableId>,
    label: String,
}

/// A version set's identity: its name, members and label.
type SetKey = (NameId, Vec<SolvableId>, String);

struct Provider<'u> {
    pkgs: &'u [IndexEntry],
    /// Package names: first every real package's, then, as relations
    /// mention them, names no package has (so the solver can name them).
    names: RefCell<Vec<String>>,
    name_ids: RefCell<HashMap<String, NameId>>,
    /// Real packages (solvables) of each name.
    by_name: Vec<Vec<SolvableId>>,
    /// Packages that provide each name, with the version they provide.
    provided: HashMap<String, Vec<(SolvableId, Option<String>)>>,
    excluded: HashSet<String>,
    solvable_names: Vec<NameId>,
    sets: RefCell<Vec<VSet>>,
    set_ids: RefCell<HashMap<SetKey, VersionSetId>>,
    unions: RefCell<Vec<Vec<VersionSetId>>>,
    strings: RefCell<Vec<String>>,
}

fn sid(i: usize) -> SolvableId {
    SolvableId::from_index(i)
}

impl<'u> Provider<'u> {
    fn new(pkgs: &'u [IndexEntry], excluded: HashSet<String>) -> Provider<'u> {
        let mut p = Provider {
            pkgs,
            names: RefCell::new(Vec::new()),
            name_ids: RefCell::new(HashMap::new()),
            by_name: Vec::new(),
            provided: HashMap::new(),
            excluded,
            solvable_names: Vec::with_capacity(pkgs.len()),
            sets: RefCell::new(Vec::new()),
            set_ids: RefCell::new(HashMap::new()),
            unions: RefCell::new(Vec::new()),
            strings: RefCell::new(Vec::new()),
        };
        for (i, e) in pkgs.iter().enumerate() {
            let n = p.name_id(&e.name);
            if n.to_index() == p.by_name.len() {
                p.by_name.push(Vec::new());
            }
            p.by_name[n.to_index()].push(sid(i));
            p.solvable_names.push(n);
            if let Ok(rel) = parse_relations(&e.provides) {
                for alt in rel.into_iter().flatten() {
                    let v = match alt.version {
                        Some((Op::Eq, v)) => Some(v),
                        _ => None,
                    };
                    p.provided.entry(alt.name).or_default().push((sid(i), v));
                }
            }
        }
        p
    }

    /// The id of `name`, given one if it has none yet.
    fn name_id(&self, name: &str) -> NameId {
        if let Some(id) = self.name_ids.borrow().get(name) {
            return *id;
        }
        let mut names = self.names.borrow_mut();
        let id = NameId::from_index(names.len());
        names.push(name.to_string());
        self.name_ids.borrow_mut().insert(name.to_string(), id);
        id
    }

    /// The real packages (solvables) named `name`.
    fn real(&self, name: &str) -> &[SolvableId] {
        match self.name_ids.borrow().get(name) {
            Some(n) => self.by_name.get(n.to_index()).map(Vec::as_slice).unwrap_or(&[]),
            None => &[],
        }
    }

    fn known(&self, name: &str) -> bool {
        !self.real(name).is_empty() || self.provided.contains_key(name)
    }

    fn entry(&self, s: SolvableId) -> &IndexEntry {
        &self.pkgs[s.to_index()]
    }

    fn set(&self, name: &str, mut members: Vec<SolvableId>, label: String) -> VersionSetId {
        let name = self.name_id(name);
        members.sort();
        members.dedup();
        let key = (name, members.clone(), label.clone());
        if let Some(id) = self.set_ids.borrow().get(&key) {
            return *id;
        }
        let mut sets = self.sets.borrow_mut();
        let id = VersionSetId(sets.len() as u32);
        sets.push(VSet { name, members, label });
        self.set_ids.borrow_mut().insert(key, id);
        id
    }

    /// The version sets that satisfy one alternative `dep`: the real package
    /// at matching versions, then each package providing it.
    fn alternative_sets(&self, dep: &Dep, out: &mut Vec<VersionSetId>) {
        let real: Vec<SolvableId> = self.real(&dep.name).to_vec();
        let matching: Vec<SolvableId> = real
            .iter()
            .copied()
            .filter(|s| dep.version.as_ref().is_none_or(|(op, v)| op.matches(&self.entry(*s).version, v)))
            .collect();
        let providers = self.provided.get(&dep.name);
        if !real.is_empty() || providers.is_none() {
            out.push(self.set(&dep.name, matching, constraint(dep)));
        }
        if let Some(list) = providers {
            let mut by_provider: Vec<(String, u8, Vec<SolvableId>)> = Vec::new();
            for (s, pv) in list {
                let ok = match (&dep.version, pv) {
                    (None, _) => true,
                    (Some((op, v)), Some(pv)) => op.matches(pv, v),
                    (Some(_), None) => false, // dpkg: unversioned Provides never satisfy a versioned dependency
                };
                if !ok {
                    continue;
                }
                let e = self.entry(*s);
                match by_provider.iter_mut().find(|(n, _, _)| *n == e.name) {
                    Some((_, _, v)) => v.push(*s),
                    None => by_provider.push((e.name.clone(), e.priority, vec![*s])),
                }
            }
            // As apt: the provider of the highest priority first, then by name.
            by_provider.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
            for (pname, _, members) in by_provider {
                out.push(self.set(
                    &pname,
                    members,
                    format!("(provides {})", Dep { arch: None, ..dep.clone() }),
                ));
            }
        }
    }

    fn requirement(&self, clause: &[Dep]) -> Option<Requirement> {
        if clause.iter().any(|d| self.excluded.contains(&d.name)) {
            return None;
        }
        let mut sets = Vec::new();
        for d in clause {
            self.alternative_sets(d, &mut sets);
        }
        let mut seen = HashSet::new();
        sets.retain(|s| seen.insert(*s));
        Some(match sets.as_slice() {
            [one] => Requirement::Single(*one),
            _ => {
                let mut unions = self.unions.borrow_mut();
                unions.push(sets);
                Requirement::Union(VersionSetUnionId((unions.len() - 1) as u32))
            }
        })
    }

    fn intern_string(&self, s: String) -> StringId {
        let mut strings = self.strings.borrow_mut();
        strings.push(s);
        StringId((strings.len() - 1) as u32)
    }
}

impl Interner for Provider<'_> {
    type NameId = NameId;
    type SolvableId = SolvableId;

    fn display_solvable(&self, solvable: SolvableId) -> impl Display + '_ {
        let e = self.entry(solvable);
        format!("{} {}", e.name, e.version)
    }

    fn display_merged_solvables(&self, solvables: &[SolvableId]) -> impl Display + '_ {
        let Some(first) = solvables.first() else { return String::new() };
        let versions: Vec<&str> = solvables.iter().map(|s| self.entry(*s).version.as_str()).collect();
        format!("{} {}", self.entry(*first).name, versions.join(" | "))
    }

    fn display_name(&self, name: NameId) -> impl Display + '_ {
        self.names.borrow()[name.to_index()].clone()
    }

    fn display_version_set(&self, version_set: VersionSetId) -> impl Display + '_ {
        self.sets.borrow()[version_set.0 as usize].label.clone()
    }

    fn display_string(&self, string_id: StringId) -> impl Display + '_ {
        self.strings.borrow()[string_id.0 as usize].clone()
    }

    fn version_set_name(&self, version_set: VersionSetId) -> NameId {
        self.sets.borrow()[version_set.0 as usize].name
    }

    fn solvable_name(&self, solvable: SolvableId) -> NameId {
        self.solvable_names[solvable.to_index()]
    }

    fn version_sets_in_union(&self, u: VersionSetUnionId) -> impl Iterator<Item = VersionSetId> {
        self.unions.borrow()[u.0 as usize].clone().into_iter()
    }

    fn resolve_condition(&self, _condition: ConditionId) -> Condition {
        unreachable!("kiln makes no conditional requirements")
    }
}

impl DependencyProvider for Provider<'_> {
    async fn filter_candidates(
        &self,
        candidates: &[SolvableId],
        vs: VersionSetId,
        inverse: bool,
    ) -> Vec<SolvableId> {
        let sets = self.sets.borrow();
        let members = &sets[vs.0 as usize].members;
        candidates.iter().copied().filter(|c| members.binary_search(c).is_ok() != inverse).collect()
    }

    async fn get_candidates(&self, name: NameId) -> Option<Candidates<SolvableId>> {
        let list = self.by_name.get(name.to_index())?;
        if self.excluded.contains(&self.names.borrow()[name.to_index()]) {
            let why = self.intern_string("excluded by the recipe's `exclude`".into());
            return Some(Candidates {
                excluded: list.iter().map(|s| (*s, why)).collect(),
                ..Default::default()
            });
        }
        Some(Candidates { candidates: list.clone(), ..Default::default() })
    }

    async fn sort_candidates(&self, _solver: &SolverCache<Self>, solvables: &mut [SolvableId]) {
        solvables.sort_by(|a, b| {
            compare_versions(&self.entry(*b).version, &self.entry(*a).version).then_with(|| a.cmp(b))
        });
    }

    async fn get_dependencies(&self, solvable: SolvableId) -> Dependencies {
        let e = self.entry(solvable);
        let mut requirements = Vec::new();
        for field in [&e.pre_depends, &e.depends] {
            let clauses = match parse_relations(field) {
                Ok(c) => c,
                Err(why) => {
                    return Dependencies::Unknown(
                        self.intern_string(format!("its dependencies do not parse: {why}")),
                    )
                }
            };
            for clause in clauses {
                if let Some(r) = self.requirement(&clause) {
                    requirements.push(ConditionalRequirement { condition: None, requirement: r });
                }
            }
        }
        let mut constrains = Vec::new();
        for field in [&e.conflicts, &e.breaks] {
            let Ok(clauses) = parse_relations(field) else { continue };
            for dep in clauses.into_iter().flatten() {
                if dep.name == e.name {
                    continue;
                }
                let matches = |s: &SolvableId| {
                    dep.version.as_ref().is_none_or(|(op, v)| op.matches(&self.entry(*s).version, v))
                };
                let real = self.real(&dep.name);
                if !real.is_empty() {
                    let allowed = real.iter().copied().filter(|s| !matches(s)).collect();
                    constrains.push(self.set(
                        &dep.name,
                        allowed,
                        format!("(not {}: {} {} conflicts with it)", constraint(&dep), e.name, e.version),
                    ));
                }
                let providers: BTreeSet<&str> = self
                    .provided
                    .get(&dep.name)
                    .into_iter()
                    .flatten()
                    .filter(|(_, pv)| match (&dep.version, pv) {
                        (None, _) => true,
                        (Some((op, v)), Some(pv)) => op.matches(pv, v),
                        (Some(_), None) => false,
                    })
                    .map(|(s, _)| self.entry(*s).name.as_str())
                    .filter(|n| *n != e.name && *n != dep.name)
                    .collect();
                for pname in providers {
                    let all = self.real(pname);
                    let allowed = all
                        .iter()
                        .copied()
                        .filter(|s| {
                            !self.provided[&dep.name].iter().any(|(ps, pv)| {
                                ps == s
                                    && match (&dep.version, pv) {
                                        (None, _) => true,
                                        (Some((op, v)), Some(pv)) => op.matches(pv, v),
                                        (Some(_), None) => false,
                                    }
                            })
                        })
                        .collect();
                    constrains.push(self.set(
                        pname,
                        allowed,
                        format!(
                            "(without providing {}: {} {} conflicts with it)",
                            dep.name, e.name, e.version
                        ),
                    ));
                }
            }
        }
        Dependencies::Known(KnownDependencies { requirements, constrains })
    }
}

/// Resolves `include` minus `exclude` over `pkgs`; returns the chosen
/// packages (indexes into `pkgs`), sorted by name.
pub(crate) fn resolve(
    pkgs: &[IndexEntry],
    include: &[Request],
    exclude: &[String],
) -> Result<Vec<usize>, ResolveError> {
    let provider = Provider::new(pkgs, exclude.iter().cloned().collect());

    let unknown: Vec<(String, Vec<String>)> = include
        .iter()
        .filter(|r| !provider.known(&r.name))
        .map(|r| (r.name.clone(), close_names(&r.name, provider.known_names().iter().map(String::as_str))))
        .collect();
    if !unknown.is_empty() {
        return Err(ResolveError::Unknown(unknown));
    }
    if let Some(r) = include.iter().find(|r| exclude.contains(&r.name)) {
        return Err(ResolveError::Unsatisfiable(format!(
            "`{}` is both in `include` and in `exclude`",
            r.name
        )));
    }

    let mut requirements = Vec::new();
    for r in include {
        let dep = Dep { name: r.name.clone(), arch: None, version: r.version.clone().map(|v| (Op::Eq, v)) };
        let req = provider.requirement(std::slice::from_ref(&dep)).expect("not excluded");
        requirements.push(ConditionalRequirement { condition: None, requirement: req });
    }
    let mut solver = Solver::new(provider);
    match solver.solve(Problem::new().requirements(requirements)) {
        Ok(chosen) => {
            let mut out: Vec<usize> = chosen.into_iter().map(|s| s.to_index()).collect();
            out.sort_by(|a, b| pkgs[*a].name.cmp(&pkgs[*b].name));
            Ok(out)
        }
        Err(UnsolvableOrCancelled::Unsolvable(conflict)) => {
            Err(ResolveError::Unsatisfiable(conflict.display_user_friendly(&solver).to_string()))
        }
        Err(UnsolvableOrCancelled::Cancelled(_)) => {
            Err(ResolveError::Unsatisfiable("the resolution was cancelled".into()))
        }
    }
}

/// How a version set on a real package reads after its name (resolvo
/// prints the name first): `(>= 2.0)`, or `*` for any version.
fn constraint(dep: &Dep) -> String {
    match &dep.version {
        Some((op, v)) => format!("({} {v})", op.as_str()),
        None => "*".to_string(),
    }
}

impl Provider<'_> {
    /// Every name a package has or provides.
    fn known_names(&self) -> Vec<String> {
        let names = self.names.borrow();
        names[..self.by_name.len()].iter().chain(self.provided.keys()).cloned().collect()
    }
}

/// Up to three known names closest to `name`.
fn close_names<'a>(name: &str, known: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut scored: Vec<(f64, &str)> = known
        .filter_map(|k| {
            let s = strsim::jaro_winkler(name, k);
            let contains = k.contains(name) || name.contains(k);
            (s > 0.88 || (contains && name.len() >= 3)).then_some((if contains { s + 0.1 } else { s }, k))
        })
        .collect();
    scored.sort_by(|a, b| {
        b.0.total_cmp(&a.0).then_with(|| a.1.len().cmp(&b.1.len())).then_with(|| a.1.cmp(b.1))
    });
    let mut out: Vec<String> = Vec::new();
    for (_, k) in scored {
        if !out.iter().any(|o| o == k) {
            out.push(k.to_string());
        }
        if out.len() == 3 {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkg(name: &str, version: &str, depends: &str, provides: &str, conflicts: &str) -> IndexEntry {
        IndexEntry {
            name: name.into(),
            version: version.into(),
            architecture: "amd64".into(),
            filename: format!("pool/{name}_{version}.deb"),
            size: 1,
            sha256: "00".into(),
            depends: depends.into(),
            pre_depends: String::new(),
            provides: provides.into(),
            conflicts: conflicts.into(),
            breaks: String::new(),
            essential: false,
            priority: 3,
            suite: "s".into(),
        }
    }

    fn names(pkgs: &[IndexEntry], chosen: &[usize]) -> Vec<String> {
        chosen.iter().map(|i| format!("{}={}", pkgs[*i].name, pkgs[*i].version)).collect()
    }

    fn req(n: &str) -> Request {
        Request::parse(n).unwrap()
    }

    #[test]
    fn closure_follows_versions_alternatives_and_provides() {
        let pkgs = vec![
            pkg("app", "1", "libc (>= 2), awk | gawk, mail-agent", "", ""),
            pkg("libc", "1", "", "", ""),
            pkg("libc", "3", "", "", ""),
            pkg("mawk", "1.3", "", "awk", ""),
            pkg("gawk", "5", "", "awk", ""),
            pkg("postfix", "3", "libc", "mail-agent", "exim"),
            pkg("exim", "4", "", "mail-agent", ""),
        ];
        let chosen = resolve(&pkgs, &[req("app")], &[]).unwrap();
        let got = names(&pkgs, &chosen);
        assert!(got.contains(&"libc=3".to_string()), "{got:?}");
        assert_eq!(got.iter().filter(|n| n.contains("awk")).count(), 1, "{got:?}");
        assert_eq!(got.iter().filter(|n| n.starts_with("exim") || n.starts_with("postfix")).count(), 1);
    }

    #[test]
    fn a_virtual_name_takes_the_provider_of_highest_priority_as_apt_does() {
        let mut mawk = pkg("mawk", "1.3", "", "awk", "");
        mawk.priority = 0; // required
        let pkgs = vec![pkg("base", "1", "awk", "", ""), pkg("gawk", "5", "", "awk", ""), mawk];
        let chosen = resolve(&pkgs, &[req("base")], &[]).unwrap();
        assert_eq!(names(&pkgs, &chosen), ["base=1", "mawk=1.3"]);
    }

    #[test]
    fn versioned_dependencies_need_versioned_provides() {
        let pkgs = vec![
            pkg("a", "1", "v (>= 2)", "", ""),
            pkg("p", "1", "", "v", ""),
            pkg("q", "1", "", "v (= 2)", ""),
        ];
        let chosen = resolve(&pkgs, &[req("a")], &[]).unwrap();
        assert_eq!(names(&pkgs, &chosen), ["a=1", "q=1"]);
    }

    #[test]
    fn conflicts_are_explained() {
        let pkgs =
            vec![pkg("a", "1", "c (>= 2)", "", ""), pkg("b", "1", "", "", "c"), pkg("c", "2", "", "", "")];
        let Err(ResolveError::Unsatisfiable(why)) = resolve(&pkgs, &[req("a"), req("b")], &[]) else {
            panic!("expected a conflict")
        };
        assert!(why.contains('c'), "{why}");
        let Err(ResolveError::Unsatisfiable(why)) = resolve(&pkgs, &[req("a=1"), req("c=1")], &[]) else {
            panic!("expected a conflict")
        };
        assert!(why.contains("c"), "{why}");
    }

    #[test]
    fn unknown_names_get_suggestions_and_exclude_drops_clauses() {
        let pkgs = vec![pkg("busybox-static", "1", "", "", ""), pkg("app", "1", "perl-base", "", "")];
        let Err(ResolveError::Unknown(u)) = resolve(&pkgs, &[req("busybox-statc")], &[]) else { panic!() };
        assert_eq!(u[0].1, ["busybox-static"]);
        let chosen = resolve(&pkgs, &[req("app")], &["perl-base".into()]).unwrap();
        assert_eq!(names(&pkgs, &chosen), ["app=1"]);
        assert!(Request::parse("Bad Name").is_err());
    }
}
