//! The scheduler: every stage the final image needs, and the final image,
//! as a tokio task that waits only for the stages it uses, so independent
//! stages build at the same time; each target's steps run in order on a
//! blocking thread.

use std::collections::HashMap;
use std::sync::Arc;

use kiln_recipes::recipe::Stage;
use kiln_recipes::Recipe;

use super::model::{Built, Target};
use super::session::Session;
use super::target::build_target;

type Slot = tokio::sync::watch::Receiver<Option<Option<Arc<Built>>>>;

/// The scheduler: every needed stage and the final image as a tokio task
/// that waits only for the stages it uses; each target's steps run on a
/// blocking thread. The final image's result, or `None` when a target failed.
pub(super) async fn run_targets(s: Arc<Session>, stages: Vec<&Stage>) -> Option<Arc<Built>> {
    let recipe: &Recipe = &s.recipe;
    let mut slots: HashMap<String, Slot> = HashMap::new();
    let mut tasks = Vec::new();
    let spawn = |stage: Option<String>, deps: Vec<(String, Slot)>| {
        let s = s.clone();
        let (tx, rx) = tokio::sync::watch::channel(None);
        let task = tokio::spawn(async move {
            let mut done = HashMap::new();
            for (name, mut slot) in deps {
                let got = slot.wait_for(|v| v.is_some()).await.ok().and_then(|v| v.clone().flatten());
                match got {
                    Some(b) => {
                        done.insert(name, b);
                    }
                    None => {
                        let _ = tx.send(Some(None)); // a stage it needs failed
                        return;
                    }
                }
            }
            let s2 = s.clone();
            let res = tokio::task::spawn_blocking(move || {
                let recipe = &s2.recipe;
                let t = Target {
                    stage: stage
                        .as_deref()
                        .map(|n| recipe.stages.iter().find(|x| x.name == n).expect("stage")),
                    recipe,
                };
                build_target(&s2, t, &done)
            })
            .await;
            let built = match res {
                Ok(Ok(b)) => Some(Arc::new(b)),
                Ok(Err(e)) => {
                    s.fail(e);
                    None
                }
                Err(panic) => std::panic::resume_unwind(panic.into_panic()),
            };
            let _ = tx.send(Some(built));
        });
        (rx, task)
    };
    for st in &stages {
        let deps = Target { stage: Some(st), recipe }
            .deps()
            .into_iter()
            .map(|n| (n.to_string(), slots[n].clone()))
            .collect();
        let (rx, task) = spawn(Some(st.name.clone()), deps);
        slots.insert(st.name.clone(), rx);
        tasks.push(task);
    }
    let deps = Target { stage: None, recipe }
        .deps()
        .into_iter()
        .map(|n| (n.to_string(), slots[n].clone()))
        .collect();
    let (mut rx, task) = spawn(None, deps);
    tasks.push(task);
    let result = rx.wait_for(|v| v.is_some()).await.ok().and_then(|v| v.clone().flatten());
    for t in tasks {
        let _ = t.await; // stages nothing waits for still finish (their layers are cached)
    }
    result
}
