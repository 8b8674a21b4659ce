//! The build through the `Executor` seam: a recipe with `run` steps built
//! with a fake executor, no root and no engine. The fake writes one file
//! saying what it was asked (command, environment, user, folder, and what
//! the parent image holds), so the test sees both sides of the seam.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use kiln_builder::exec::{Executor, RunRequest, RunResult};
use kiln_builder::{BackendChoice, BuildError, BuildOptions, NullReporter};
use kiln_oci::changes::{Change, ChangeKind};
use kiln_oci::layer::Content;

#[derive(Debug, Default)]
struct FakeExecutor {
    runs: AtomicUsize,
}

impl Executor for FakeExecutor {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn run(
        &self,
        _store: &kiln_cache::Store,
        req: &RunRequest<'_>,
        on_line: &mut dyn FnMut(&str),
    ) -> Result<RunResult, BuildError> {
        let n = self.runs.fetch_add(1, Ordering::SeqCst);
        let command = req.argv.last().cloned().unwrap_or_default();
        on_line(&format!("fake ran: {command}"));
        if command == "false" {
            return Ok(RunResult::Failed { code: 3, tail: vec!["it failed".into()] });
        }
        let motd = req.tree.get("etc/motd")?.is_some();
        let text = format!(
            "argv={:?}\nenv={:?}\nuser={}\nworkdir={}\nmotd={motd}\nparents={}\n",
            req.argv,
            req.env,
            req.user,
            req.workdir,
            req.layers.len()
        );
        let bytes = text.into_bytes();
        let changes = vec![
            Change {
                path: "out".into(),
                mode: 0o755,
                uid: 0,
                gid: 0,
                kind: ChangeKind::Dir { opaque: false },
                xattrs: Vec::new(),
            },
            Change {
                path: format!("out/run-{n}"),
                mode: 0o644,
                uid: 0,
                gid: 0,
                kind: ChangeKind::File {
                    size: bytes.len() as u64,
                    content: Content::Bytes(bytes),
                    link: None,
                },
                xattrs: Vec::new(),
            },
        ];
        Ok(RunResult::Changed { changes, keep: Box::new(()) })
    }
}

fn options(cache: &std::path::Path, executor: Arc<FakeExecutor>) -> BuildOptions {
    BuildOptions {
        step_timeout: None,
        context: None,
        cache_dir: cache.to_path_buf(),
        no_cache: false,
        platform: None,
        epoch_override: None,
        outputs: Vec::new(),
        backend: BackendChoice::Auto,
        executor: Some(executor),
        secrets: Vec::new(),
        cache_from: Vec::new(),
        cache_to: Vec::new(),
        cache_mounts: false,
        registry: Default::default(),
    }
}

const RECIPE: &str = r#"
[image]
name = "fake"

[[step]]
write = "/etc/motd"
content = "hi\n"

[[step]]
run = "make it"
env = { MODE = "fast" }
workdir = "/srv"

[[step]]
run = "make more"
"#;

#[test]
fn run_steps_build_through_a_fake_executor_and_hit_the_second_time() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let recipe = kiln_recipes::parse::parse_str("kiln.toml", RECIPE.into(), dir.path()).unwrap();
    let fake = Arc::new(FakeExecutor::default());
    let mut opts = options(&dir.path().join("cache"), fake.clone());
    opts.outputs = vec![kiln_recipes::ImageRef::parse(&format!("oci:{}", out.display())).unwrap()];

    let first = kiln_builder::build(&recipe, &opts, Arc::new(NullReporter)).unwrap();
    assert_eq!(fake.runs.load(Ordering::SeqCst), 2, "both run steps ran");
    assert!(first.steps.iter().all(|s| !s.hit));
    assert_eq!(first.image.layers.len(), 3);

    let second = kiln_builder::build(&recipe, &opts, Arc::new(NullReporter)).unwrap();
    assert_eq!(fake.runs.load(Ordering::SeqCst), 2, "nothing ran again");
    assert!(second.steps.iter().all(|s| s.hit), "every step a HIT");
    assert_eq!(second.image.manifest, first.image.manifest);

    // What the executor was asked, as the build's layer holds it.
    let store = kiln_cache::Store::open(&dir.path().join("cache")).unwrap();
    let tree = kiln_oci::fstree::FsTree::of_layers(&store, &first.image.layers).unwrap();
    let files = kiln_oci::extract::read_files(
        &store,
        &first.image.layers,
        &tree,
        &["out/run-0".to_string(), "out/run-1".to_string()],
    )
    .unwrap();
    let asked = String::from_utf8(files["out/run-0"].clone()).unwrap();
    assert!(asked.contains("\"make it\""), "{asked}");
    assert!(asked.contains("MODE=fast") && asked.contains("workdir=/srv"), "{asked}");
    assert!(asked.contains("motd=true") && asked.contains("parents=1"), "{asked}");
    assert!(String::from_utf8_lossy(&files["out/run-1"]).contains("parents=2"));
}

#[test]
fn a_failed_command_is_the_build_s_error_and_nothing_is_cached() {
    let dir = tempfile::tempdir().unwrap();
    let text = "[image]\nname = \"fail\"\n\n[[step]]\nrun = \"false\"\n";
    let recipe = kiln_recipes::parse::parse_str("kiln.toml", text.into(), dir.path()).unwrap();
    let fake = Arc::new(FakeExecutor::default());
    let mut opts = options(&dir.path().join("cache"), fake.clone());
    opts.outputs =
        vec![kiln_recipes::ImageRef::parse(&format!("oci:{}", dir.path().join("o").display())).unwrap()];
    for _ in 0..2 {
        match kiln_builder::build(&recipe, &opts, Arc::new(NullReporter)) {
            Err(e @ BuildError::CommandFailed { .. }) => {
                assert_eq!(e.exit_code(), 1);
                assert!(e.to_string().contains("false"), "{e}");
            }
            other => panic!("expected the command's failure, got {other:?}"),
        }
    }
    assert_eq!(fake.runs.load(Ordering::SeqCst), 2, "a failed step is not cached");
}
