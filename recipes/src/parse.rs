//! Recipe text → [`Recipe`]: TOML with spans, then a check of every value.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use toml::Spanned;

use crate::args::{expand, is_arg_name, Arg, ArgValue, ExpandError};
use crate::diagnostic::RecipeError;
use crate::raw::{RawConfig, RawImage, RawPackages, RawRecipe, RawStage, RawStep, RawVm};
use crate::recipe::{
    debian_architecture, Base, CacheMount, Command, Config, CopyStep, FileMode, Healthcheck, Image, Owner,
    Packages, Platform, Recipe, RunStep, SecretUse, Sharing, Span, Stage, Step, StepKind, Suite, Vm, VmBoot,
    VmFilesystem, WriteStep,
};
use crate::reference::ImageRef;

/// Reads and validates the recipe at `path`, its `[args]` at their defaults.
pub fn parse_file(path: &Path) -> Result<Recipe, RecipeError> {
    parse_file_with_args(path, &[])
}

/// Reads and validates the recipe at `path`, with `values` (from `--arg` and
/// `--arg-file`, later ones winning) for the arguments its `[args]` declares.
pub fn parse_file_with_args(path: &Path, values: &[ArgValue]) -> Result<Recipe, RecipeError> {
    let display = path.display().to_string();
    // The recipe may come from a pull request, and an error shows its text:
    // never a link's (to `/proc/self/environ`, a runner's secret), never a
    // kernel file, a fifo or a device.
    let bytes = crate::args::read_plain_file(path, MAX_RECIPE).map_err(|e| {
        RecipeError::new(&display, &Arc::new(String::new()), None, format!("cannot read the recipe: {e}"))
            .with_hint("check the path; a recipe is a TOML file such as `recipes/examples/hello/kiln.toml`, named by a path without symlinks")
    })?;
    let text = String::from_utf8(bytes).map_err(|e| {
        // Where the first bad byte is, counted in the text before it (never the bytes themselves).
        let good = e.utf8_error().valid_up_to();
        let prefix = Arc::new(String::from_utf8_lossy(&e.as_bytes()[..good]).into_owned());
        RecipeError::new(&display, &prefix, Some(good..good), "the recipe is not UTF-8 text")
            .with_hint("save the recipe as UTF-8; TOML files are UTF-8")
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    parse_str_with_args(&display, text, &dir, values)
}

/// Validates recipe `text`, read from `file`, whose relative paths start at `dir`.
pub fn parse_str(file: &str, text: String, dir: &Path) -> Result<Recipe, RecipeError> {
    parse_str_with_args(file, text, dir, &[])
}

/// [`parse_str`] with values for the recipe's `[args]`.
pub fn parse_str_with_args(
    file: &str,
    text: String,
    dir: &Path,
    values: &[ArgValue],
) -> Result<Recipe, RecipeError> {
    let p = Parser { file: file.to_string(), source: Arc::new(text), values: values.to_vec() };
    p.parse(dir)
}

/// The largest recipe kiln reads.
const MAX_RECIPE: u64 = 16 << 20;

/// The last second of the year 9999: later times have no RFC 3339 form,
/// so no tool could read the image's `created`.
pub const MAX_EPOCH: i64 = 253_402_300_799;

struct Parser {
    file: String,
    source: Arc<String>,
    /// Values for `[args]` from the command line.
    values: Vec<ArgValue>,
}

impl Parser {
    fn err(&self, span: Span, message: impl Into<String>) -> RecipeError {
        RecipeError::new(&self.file, &self.source, Some(span), message)
    }

    fn parse(&self, dir: &Path) -> Result<Recipe, RecipeError> {
        let mut raw: RawRecipe = toml::from_str(&self.source).map_err(|e| self.toml_error(e))?;
        let (args, values) = self.args(raw.args.take())?;
        self.substitute(&mut raw, &values)?;

        let image = raw.image.ok_or_else(|| {
            RecipeError::new(&self.file, &self.source, Some(0..0), "the recipe has no `[image]` table")
                .with_hint("start the recipe with `[image]` and `name = \"...\"`")
        })?;

        // Stages may use only the stages before them, so there are no cycles.
        let mut stages: Vec<Stage> = Vec::with_capacity(raw.stages.len());
        let mut stage_packages = Vec::with_capacity(raw.stages.len());
        for st in raw.stages {
            let mut st = st.into_inner();
            stage_packages.push(st.packages.take());
            let stage = self.stage(st, &stages, dir)?;
            stages.push(stage);
        }
        let image = self.image(image.into_inner(), dir, &stages)?;
        for (stage, pk) in stages.iter_mut().zip(stage_packages) {
            if let Some(pk) = pk {
                let span = pk.span();
                let p = self.packages(pk.into_inner(), span.clone(), dir, &image, Some(&stage.name))?;
                put_packages(&mut stage.steps, p, span);
            }
        }
        let mut steps = self.steps(raw.steps, &stages)?;
        if let Some(pk) = raw.packages {
            let span = pk.span();
            let packages = self.packages(pk.into_inner(), span.clone(), dir, &image, None)?;
            put_packages(&mut steps, packages, span);
        }

        let config = match raw.config {
            Some(c) => self.config(c.into_inner())?,
            None => Config::default(),
        };

        let vm = match raw.vm {
            Some(v) => self.vm(v.into_inner())?,
            None => Vm::default(),
        };

        Ok(Recipe {
            file: PathBuf::from(&self.file),
            source: self.source.clone(),
            dir: dir.to_path_buf(),
            stages,
            image,
            steps,
            config,
            vm,
            args,
        })
    }

    /// `[args]` with the command line's values in: each argument, and the map
    /// `${NAME}` is replaced from.
    #[allow(clippy::type_complexity)]
    fn args(
        &self,
        raw: Option<Spanned<BTreeMap<Spanned<String>, Spanned<toml::Value>>>>,
    ) -> Result<(Vec<Arg>, BTreeMap<String, String>), RecipeError> {
        let table = raw.as_ref().map(|t| t.span());
        let mut args = Vec::new();
        for (name, default) in raw.map(Spanned::into_inner).unwrap_or_default() {
            if !is_arg_name(name.get_ref()) {
                return Err(self
                    .err(name.span(), format!("`{}` is not an argument name", name.get_ref().escape_debug()))
                    .with_hint(
                        "argument names are a letter or `_`, then letters, digits and `_`, e.g. `VERSION`",
                    ));
            }
            let toml::Value::String(value) = default.get_ref() else {
                return Err(self
                    .err(default.span(), format!("the default of `{}` is not a string", name.get_ref()))
                    .with_hint(format!(
                        "arguments are text: write `{} = \"...\"` (quoted, e.g. `\"1.0\"`)",
                        name.get_ref()
                    )));
            };
            args.push(Arg { name: name.into_inner(), value: value.clone(), origin: "default".into() });
        }
        for v in &self.values {
            let Some(arg) = args.iter_mut().find(|a| a.name == v.name) else {
                let mut e = RecipeError::new(
                    &self.file,
                    &self.source,
                    table.clone(),
                    format!("`{}` ({}) is not declared in the recipe's `[args]`", v.name, v.origin),
                )
                .with_hint(format!(
                    "declare it with a default: `[args]` then `{} = \"...\"`; or do not pass it",
                    v.name
                ));
                if table.is_some() {
                    e = e.with_label("the arguments this recipe takes");
                }
                return Err(e);
            };
            arg.value = v.value.clone();
            arg.origin = v.origin.clone();
        }
        let values = args.iter().map(|a| (a.name.clone(), a.value.clone())).collect();
        Ok((args, values))
    }

    /// Replaces `${NAME}` in the string values arguments may appear in: all of
    /// `[image]`, `[[stage]]` bases, steps (not `from` or `secrets`), `[config]`
    /// and `[vm]`; not in `[packages]` (kiln.lock answers the recipe as written),
    /// not in names of stages, tables' keys or `[args]` itself.
    fn substitute(&self, raw: &mut RawRecipe, a: &BTreeMap<String, String>) -> Result<(), RecipeError> {
        if let Some(image) = &mut raw.image {
            let image = image.get_mut();
            self.sub(&mut image.name, a)?;
            self.sub_opt(&mut image.base, a)?;
            self.sub_opt(&mut image.platform, a)?;
            for v in image.annotations.values_mut() {
                self.sub(v, a)?;
            }
        }
        for stage in &mut raw.stages {
            let stage = stage.get_mut();
            self.sub_opt(&mut stage.base, a)?;
            self.sub_steps(&mut stage.steps, a)?;
        }
        self.sub_steps(&mut raw.steps, a)?;
        if let Some(c) = &mut raw.config {
            let c = c.get_mut();
            self.sub_value_opt(&mut c.entrypoint, a)?;
            self.sub_value_opt(&mut c.cmd, a)?;
            self.sub_value_opt(&mut c.shell, a)?;
            if let Some(h) = &mut c.healthcheck {
                let h = h.get_mut();
                self.sub_value(&mut h.test, a)?;
                for v in [&mut h.interval, &mut h.timeout, &mut h.start_period, &mut h.start_interval] {
                    self.sub_opt(v, a)?;
                }
            }
            for v in c.env.values_mut().chain(c.labels.values_mut()) {
                self.sub(v, a)?;
            }
            for v in c.ports.iter_mut().chain(c.volumes.iter_mut()) {
                self.sub(v, a)?;
            }
            self.sub_opt(&mut c.workdir, a)?;
            self.sub_opt(&mut c.user, a)?;
            self.sub_opt(&mut c.stop_signal, a)?;
        }
        if let Some(vm) = &mut raw.vm {
            let vm = vm.get_mut();
            self.sub_value_opt(&mut vm.size, a)?;
            for v in [&mut vm.filesystem, &mut vm.cmdline, &mut vm.boot, &mut vm.init] {
                self.sub_opt(v, a)?;
            }
        }
        Ok(())
    }

    fn sub_steps(
        &self,
        steps: &mut [Spanned<RawStep>],
        a: &BTreeMap<String, String>,
    ) -> Result<(), RecipeError> {
        for s in steps {
            let s = s.get_mut();
            for v in [
                &mut s.copy,
                &mut s.to,
                &mut s.write,
                &mut s.content,
                &mut s.owner,
                &mut s.user,
                &mut s.workdir,
                &mut s.timeout,
            ] {
                self.sub_opt(v, a)?;
            }
            self.sub_value_opt(&mut s.run, a)?;
            if let Some(list) = &mut s.cache {
                for m in list.get_mut() {
                    let m = m.get_mut();
                    self.sub(&mut m.target, a)?;
                    self.sub_opt(&mut m.id, a)?;
                }
            }
            self.sub_value_opt(&mut s.mode, a)?;
            if let Some(env) = &mut s.env {
                let span = env.span();
                for v in env.get_mut().values_mut() {
                    if let Some(new) = expand(v, a).map_err(|e| self.expand_error(span.clone(), v, e))? {
                        *v = new;
                    }
                }
            }
        }
        Ok(())
    }

    fn sub_opt(
        &self,
        v: &mut Option<Spanned<String>>,
        a: &BTreeMap<String, String>,
    ) -> Result<(), RecipeError> {
        match v {
            Some(v) => self.sub(v, a),
            None => Ok(()),
        }
    }

    fn sub(&self, v: &mut Spanned<String>, a: &BTreeMap<String, String>) -> Result<(), RecipeError> {
        let span = v.span();
        if let Some(new) = expand(v.get_ref(), a).map_err(|e| self.expand_error(span, v.get_ref(), e))? {
            *v.get_mut() = new;
        }
        Ok(())
    }

    fn sub_value_opt(
        &self,
        v: &mut Option<Spanned<toml::Value>>,
        a: &BTreeMap<String, String>,
    ) -> Result<(), RecipeError> {
        match v {
            Some(v) => self.sub_value(v, a),
            None => Ok(()),
        }
    }

    /// Every string in a value (a string, or an array's strings).
    fn sub_value(
        &self,
        v: &mut Spanned<toml::Value>,
        a: &BTreeMap<String, String>,
    ) -> Result<(), RecipeError> {
        let span = v.span();
        let mut strings: Vec<&mut String> = Vec::new();
        match v.get_mut() {
            toml::Value::String(s) => strings.push(s),
            toml::Value::Array(items) => strings.extend(items.iter_mut().filter_map(|i| match i {
                toml::Value::String(s) => Some(s),
                _ => None,
            })),
            _ => {}
        }
        for s in strings {
            if let Some(new) = expand(s, a).map_err(|e| self.expand_error(span.clone(), s, e))? {
                *s = new;
            }
        }
        Ok(())
    }

    /// An error in `${...}` within the value at `span`: the reference's own place
    /// when the recipe holds it as written, else the whole value.
    fn expand_error(&self, span: Span, value: &str, e: ExpandError) -> RecipeError {
        let needle = &value[e.at.clone()];
        let at = self
            .source
            .get(span.clone())
            .and_then(|text| text.find(needle))
            .map(|i| span.start + i..span.start + i + needle.len())
            .unwrap_or(span);
        self.err(at, e.message).with_hint(e.hint)
    }

    fn toml_error(&self, e: toml::de::Error) -> RecipeError {
        let raw = e.message().trim();
        let type_error = raw.starts_with("invalid type");
        let message = readable_type_error(raw);
        let span = e.span().unwrap_or(0..0);
        let mut err = RecipeError::new(&self.file, &self.source, Some(span.clone()), message.clone());
        if let Some(hint) = unknown_field_hint(&message) {
            err = err.with_hint(hint);
        } else if type_error {
            let example = self.key_at(span.start).and_then(key_example);
            err = err.with_hint(match example {
                Some(e) => format!("e.g. `{e}`; the recipe reference in the README gives each key's type"),
                None => "see the recipe reference in the README for each key's type".to_string(),
            });
        }
        err
    }

    /// The key whose value starts at byte `at`: the text before `=` on its line.
    fn key_at(&self, at: usize) -> Option<&str> {
        let head = self.source.get(..at)?;
        let line = &head[head.rfind('\n').map_or(0, |i| i + 1)..];
        let (key, _) = line.rsplit_once('=')?;
        let key = key.trim().rsplit(['{', ',', '.']).next()?.trim();
        (!key.is_empty()).then_some(key)
    }

    fn stage(&self, raw: RawStage, before: &[Stage], dir: &Path) -> Result<Stage, RecipeError> {
        let name = raw.name.get_ref();
        if !is_valid_name(name) {
            return Err(self.err(raw.name.span(), format!("`{name}` is not a valid stage name")).with_hint(
                "names are lowercase letters, digits, `.`, `_` and `-`, starting with a letter or digit",
            ));
        }
        if before.iter().any(|s| &s.name == name) {
            return Err(self
                .err(raw.name.span(), format!("there is already a stage named `{name}`"))
                .with_hint("give each `[[stage]]` its own name"));
        }
        let (base, base_span) = match &raw.base {
            None => (Base::Scratch, None),
            Some(b) => (self.base(b, dir, before)?, Some(b.span())),
        };
        let steps = self.steps(raw.steps, before)?;
        Ok(Stage { name: name.clone(), base, base_span, steps })
    }

    fn steps(&self, raw: Vec<Spanned<RawStep>>, stages: &[Stage]) -> Result<Vec<Step>, RecipeError> {
        let mut steps = Vec::with_capacity(raw.len());
        for (index, s) in raw.into_iter().enumerate() {
            let span = s.span();
            let kind = self.step(s.into_inner(), span.clone(), stages)?;
            steps.push(Step { index, span, kind });
        }
        Ok(steps)
    }

    /// `name` must be one of `stages` (those defined above the reference).
    fn stage_ref(&self, name: &str, span: Span, stages: &[Stage]) -> Result<String, RecipeError> {
        if stages.iter().any(|s| s.name == name) {
            return Ok(name.to_string());
        }
        let known: Vec<String> = stages.iter().map(|s| format!("`{}`", s.name)).collect();
        let hint = if known.is_empty() {
            "define it above with `[[stage]]` and `name = \"...\"`".to_string()
        } else {
            format!(
                "stages defined above this point: {}; a stage can only use stages defined before it",
                known.join(", ")
            )
        };
        Err(self.err(span, format!("there is no stage named `{name}` above this point")).with_hint(hint))
    }

    fn image(&self, raw: RawImage, dir: &Path, stages: &[Stage]) -> Result<Image, RecipeError> {
        let name = raw.name.get_ref();
        if !is_valid_name(name) {
            return Err(self.err(raw.name.span(), format!("`{name}` is not a valid image name")).with_hint(
                "names are lowercase letters, digits, `.`, `_` and `-`, starting with a letter or digit",
            ));
        }
        let (base, base_span) = match &raw.base {
            None => (Base::Scratch, None),
            Some(b) => (self.base(b, dir, stages)?, Some(b.span())),
        };
        let epoch = match &raw.epoch {
            None => None,
            Some(e) if *e.get_ref() < 0 => {
                return Err(self
                    .err(e.span(), "`epoch` must not be negative")
                    .with_hint("use seconds since 1970-01-01 UTC, e.g. `epoch = 0`"))
            }
            // 9999-12-31T23:59:59Z: the last second every tool can print as a date.
            Some(e) if *e.get_ref() > MAX_EPOCH => {
                return Err(self.err(e.span(), "`epoch` is past the year 9999").with_hint(
                    "use seconds since 1970-01-01 UTC up to 253402300799 (9999-12-31), e.g. `epoch = 0`",
                ))
            }
            Some(e) => Some(*e.get_ref() as u64),
        };
        let platform = match &raw.platform {
            None => None,
            Some(p) => Some(
                Platform::parse(p.get_ref())
                    .map_err(|m| self.err(p.span(), m).with_hint("e.g. `platform = \"linux/amd64\"`"))?,
            ),
        };
        let mut annotations = BTreeMap::new();
        for (k, v) in raw.annotations {
            if let Some(why) = annotation_problem(k.get_ref(), v.get_ref()) {
                return Err(self.err(k.span(), why).with_hint(ANNOTATION_HINT));
            }
            annotations.insert(k.into_inner(), v.into_inner());
        }
        Ok(Image { name: name.clone(), base, base_span, epoch, platform, annotations })
    }

    fn vm(&self, raw: RawVm) -> Result<Vm, RecipeError> {
        let mut vm = Vm::default();
        if let Some(size) = &raw.size {
            let hint = "write the disk size as e.g. `size = \"2G\"` or `\"512M\"` (a multiple of 1 MiB), or leave it out for the content plus headroom";
            let bytes = match size.get_ref() {
                toml::Value::String(s) => parse_disk_size(s),
                toml::Value::Integer(n) => u64::try_from(*n).ok(),
                _ => None,
            };
            let Some(bytes) = bytes.filter(|b| *b > 0) else {
                return Err(self.err(size.span(), "`size` is not a disk size").with_hint(hint));
            };
            if bytes % (1 << 20) != 0 {
                return Err(self.err(size.span(), "`size` is not a multiple of 1 MiB").with_hint(hint));
            }
            vm.size = Some(bytes);
            vm.size_span = Some(size.span());
        }
        if let Some(fs) = &raw.filesystem {
            vm.filesystem = match fs.get_ref().as_str() {
                "ext4" => VmFilesystem::Ext4,
                other => {
                    return Err(self
                        .err(fs.span(), format!("`{other}` is not a filesystem kiln writes"))
                        .with_hint("use `filesystem = \"ext4\"`"))
                }
            };
        }
        if let Some(c) = &raw.cmdline {
            if c.get_ref().contains(['\n', '\r']) || c.get_ref().len() > 1024 {
                return Err(self
                    .err(c.span(), "`cmdline` must be one line of at most 1024 bytes")
                    .with_hint("write the kernel arguments separated by spaces"));
            }
            vm.cmdline = c.get_ref().trim().to_string();
        }
        if let Some(b) = &raw.boot {
            vm.boot = match b.get_ref().as_str() {
                "bios" => VmBoot::Bios,
                "uefi" => VmBoot::Uefi,
                "none" => VmBoot::None,
                other => {
                    return Err(self.err(b.span(), format!("`{other}` is not a boot method")).with_hint(
                        "use `boot = \"bios\"` (the default), `\"uefi\"`, or `\"none\"` for a data disk",
                    ))
                }
            };
        }
        if let Some(i) = &raw.init {
            let (path, _) = normalize_image_path(i.get_ref())
                .ok()
                .filter(|_| i.get_ref().starts_with('/'))
                .ok_or_else(|| {
                self.err(i.span(), format!("`{}` is not an absolute path in the image", i.get_ref()))
                    .with_hint(
                        "e.g. `init = \"/lib/systemd/systemd\"`, or leave it out to run the entrypoint",
                    )
            })?;
            vm.init = Some(format!("/{path}"));
        }
        Ok(vm)
    }

    fn packages(
        &self,
        raw: RawPackages,
        span: Span,
        dir: &Path,
        image: &Image,
        stage: Option<&str>,
    ) -> Result<Packages, RecipeError> {
        let table = match stage {
            Some(_) => "`[stage.packages]`",
            None => "`[packages]`",
        };
        let suites = match (&raw.suite, &raw.suites) {
            (Some(_), Some(list)) => {
                return Err(self
                    .err(list.span(), format!("{table} has both `suite` and `suites`"))
                    .with_hint("`suite = \"bookworm\"` reads bookworm with its -updates and -security suites; `suites = [...]` lists exactly the ones to read; keep one"))
            }
            (None, None) => {
                return Err(self
                    .err(span.clone(), format!("{table} has no `suite`"))
                    .with_hint("name a Debian suite, e.g. `suite = \"bookworm\"`"))
            }
            (Some(suite), None) => {
                let name = suite.get_ref();
                if !is_debian_word(name) {
                    return Err(self
                        .err(suite.span(), format!("`{name}` is not a suite name"))
                        .with_hint("e.g. `suite = \"bookworm\"` or `\"trixie\"`"));
                }
                let mut v = vec![Suite { name: name.clone(), mirror: None, optional: false }];
                for extra in ["updates", "security"] {
                    v.push(Suite { name: format!("{name}-{extra}"), mirror: None, optional: true });
                }
                v
            }
            (None, Some(list)) => self.suites(list)?,
        };
        let scripts = raw.scripts.as_ref().map(|s| *s.get_ref()).unwrap_or(true);
        if raw.include.is_empty() {
            return Err(self
                .err(span, format!("{table} has no `include`"))
                .with_hint("list the packages to install, e.g. `include = [\"busybox-static\"]`"));
        }
        let mut include = Vec::new();
        for i in &raw.include {
            let v = i.get_ref().trim();
            let (name, version) = match v.split_once('=') {
                Some((n, ver)) => (n, Some(ver)),
                None => (v, None),
            };
            if !is_package_name(name)
                || version.is_some_and(|v| v.is_empty() || v.contains(char::is_whitespace))
            {
                return Err(self
                    .err(i.span(), format!("`{v}` is not a Debian package name"))
                    .with_hint("write `NAME` or `NAME=VERSION`, e.g. `\"python3-minimal\"`; names are lowercase letters, digits, `+`, `-` and `.`"));
            }
            if include.iter().any(|x: &String| x.split('=').next() == Some(name)) {
                return Err(self
                    .err(i.span(), format!("`{name}` is listed twice"))
                    .with_hint("list each package once"));
            }
            include.push(v.to_string());
        }
        let mut exclude = Vec::new();
        for e in &raw.exclude {
            if !is_package_name(e.get_ref()) {
                return Err(self
                    .err(e.span(), format!("`{}` is not a Debian package name", e.get_ref()))
                    .with_hint("`exclude` lists package names without versions"));
            }
            exclude.push(e.get_ref().clone());
        }
        let mut components = Vec::new();
        for c in &raw.components {
            if !is_debian_word(c.get_ref()) {
                return Err(self
                    .err(c.span(), format!("`{}` is not a component name", c.get_ref()))
                    .with_hint("components are e.g. `main`, `contrib`, `non-free-firmware`"));
            }
            components.push(c.get_ref().clone());
        }
        if components.is_empty() {
            components.push("main".to_string());
        }
        let architecture = match &raw.architecture {
            Some(a) if !is_debian_word(a.get_ref()) => {
                return Err(self
                    .err(a.span(), format!("`{}` is not a Debian architecture", a.get_ref()))
                    .with_hint("e.g. `amd64`, `arm64`, `armhf`; the default follows `platform`"))
            }
            Some(a) => Some(a.get_ref().clone()),
            None => {
                if let Some(p) = &image.platform {
                    if debian_architecture(p).is_none() {
                        return Err(self
                            .err(span, format!("Debian has no architecture for the platform `{p}`"))
                            .with_hint("set `architecture` in `[packages]`"));
                    }
                }
                None
            }
        };
        let mirror = match &raw.mirror {
            Some(m) => Some(self.mirror_url(m.get_ref(), m.span())?),
            None => None,
        };
        let keyring = raw.keyring.as_ref().map(|k| {
            let p = PathBuf::from(k.get_ref());
            if p.is_absolute() {
                p
            } else {
                dir.join(p)
            }
        });
        Ok(Packages {
            stage: stage.map(str::to_string),
            suites,
            include,
            exclude,
            components,
            architecture,
            mirror,
            keyring,
            scripts,
        })
    }

    /// `suites = ["bookworm", { name = "bookworm-security", mirror = "..." }]`.
    fn suites(&self, list: &Spanned<Vec<Spanned<toml::Value>>>) -> Result<Vec<Suite>, RecipeError> {
        const HINT: &str = "write each suite as a name, or as `{ name = \"bookworm-security\", mirror = \"URL\" }` when it has its own mirror";
        let mut out: Vec<Suite> = Vec::new();
        for item in list.get_ref() {
            let (name, mirror) = match item.get_ref() {
                toml::Value::String(n) => (n.clone(), None),
                toml::Value::Table(t) => {
                    if let Some(k) = t.keys().find(|k| *k != "name" && *k != "mirror") {
                        return Err(self
                            .err(item.span(), format!("a suite has the unknown key `{k}`"))
                            .with_hint(HINT));
                    }
                    let name = match t.get("name") {
                        Some(toml::Value::String(n)) => n.clone(),
                        _ => {
                            return Err(self.err(item.span(), "a suite has no `name` string").with_hint(HINT))
                        }
                    };
                    let mirror = match t.get("mirror") {
                        None => None,
                        Some(toml::Value::String(m)) => Some(self.mirror_url(m, item.span())?),
                        Some(_) => {
                            return Err(self
                                .err(item.span(), "a suite's `mirror` is not a string")
                                .with_hint(HINT))
                        }
                    };
                    (name, mirror)
                }
                _ => {
                    return Err(self
                        .err(item.span(), "a suite is neither a name nor a table")
                        .with_hint(HINT))
                }
            };
            if !is_debian_word(&name) {
                return Err(self
                    .err(item.span(), format!("`{name}` is not a suite name"))
                    .with_hint("e.g. `\"bookworm\"`, `\"bookworm-security\"`"));
            }
            if out.iter().any(|s| s.name == name) {
                return Err(self
                    .err(item.span(), format!("the suite `{name}` is listed twice"))
                    .with_hint("list each suite once"));
            }
            out.push(Suite { name, mirror, optional: false });
        }
        if out.is_empty() {
            return Err(self
                .err(list.span(), "`suites` is empty")
                .with_hint("list the release first, e.g. `suites = [\"bookworm\", \"bookworm-security\"]`"));
        }
        Ok(out)
    }

    fn mirror_url(&self, u: &str, span: Span) -> Result<String, RecipeError> {
        if !(u.starts_with("http://") || u.starts_with("https://") || u.starts_with("file://")) {
            return Err(self
                .err(span, format!("`{u}` is not an http://, https:// or file:// URL"))
                .with_hint("give the URL of a Debian mirror, e.g. `http://HOST/debian`"));
        }
        Ok(u.trim_end_matches('/').to_string())
    }

    fn base(&self, b: &Spanned<String>, dir: &Path, stages: &[Stage]) -> Result<Base, RecipeError> {
        let s = b.get_ref();
        if s == "scratch" {
            return Ok(Base::Scratch);
        }
        if let Some(name) = s.strip_prefix("stage:") {
            return Ok(Base::Stage(self.stage_ref(name, b.span(), stages)?));
        }
        let hint = "bases are `scratch`, `stage:NAME`, `oci:PATH[:TAG]`, `oci-archive:FILE`, `docker-archive:FILE`, `docker:REF` or `registry:HOST/REPO:TAG`";
        let r = ImageRef::parse(s).map_err(|e| self.err(b.span(), e.to_string()).with_hint(hint))?;
        let resolve = |p: PathBuf| if p.is_absolute() { p } else { dir.join(p) };
        match r {
            ImageRef::Oci { dir: d, tag } => Ok(Base::Oci { dir: resolve(d), tag }),
            ImageRef::OciArchive(p) => Ok(Base::OciArchive(resolve(p))),
            ImageRef::DockerArchive(p) => Ok(Base::DockerArchive(resolve(p))),
            ImageRef::Docker(r) => Ok(Base::Docker(r)),
            ImageRef::Registry(r) => Ok(Base::Registry(r)),
            ImageRef::Vm(_) => Err(self.err(b.span(), "a VM disk cannot be a base").with_hint(hint)),
        }
    }

    fn step(&self, s: RawStep, span: Span, stages: &[Stage]) -> Result<StepKind, RecipeError> {
        let kinds = [s.copy.is_some(), s.write.is_some(), s.run.is_some()];
        match kinds.iter().filter(|k| **k).count() {
            0 => {
                return Err(self
                    .err(span, "this step does nothing")
                    .with_hint("a step has exactly one of `copy`, `write` or `run`"))
            }
            1 => {}
            _ => {
                return Err(self
                    .err(span, "this step has more than one of `copy`, `write` and `run`")
                    .with_hint("split it into one `[[step]]` per action"))
            }
        }
        if let (None, Some(ex)) = (&s.copy, &s.exclude) {
            return Err(self
                .err(ex.span(), "`exclude` only applies to `copy` steps")
                .with_hint("remove `exclude` from this step"));
        }
        if s.run.is_some() {
            return self.run_step(s);
        }
        // Keys that belong to `run` only.
        for (key, sp) in [
            ("env", s.env.as_ref().map(|v| v.span())),
            ("network", s.network.as_ref().map(|v| v.span())),
            ("secrets", s.secrets.as_ref().map(|v| v.span())),
            ("user", s.user.as_ref().map(|v| v.span())),
            ("workdir", s.workdir.as_ref().map(|v| v.span())),
            ("timeout", s.timeout.as_ref().map(|v| v.span())),
            ("cache", s.cache.as_ref().map(|v| v.span())),
        ] {
            if let Some(sp) = sp {
                return Err(self
                    .err(sp, format!("`{key}` only applies to `run` steps"))
                    .with_hint(format!("remove `{key}` from this step")));
            }
        }
        let owner = match &s.owner {
            Some(o) => self.owner(o)?,
            None => Owner::default(),
        };
        let mode = s.mode.as_ref().map(|m| self.mode(m)).transpose()?;

        if let Some(copy) = s.copy {
            let from = match &s.from {
                Some(f) => Some(self.stage_ref(f.get_ref(), f.span(), stages)?),
                None => None,
            };
            if let Some(c) = &s.content {
                return Err(self
                    .err(c.span(), "`content` belongs to `write` steps")
                    .with_hint("a `copy` step takes its content from the context"));
            }
            let to = s.to.ok_or_else(|| {
                self.err(copy.span(), "a `copy` step needs `to`").with_hint("add `to = \"/path/in/image\"`")
            })?;
            let src = if from.is_some() {
                let (p, _) = normalize_image_path(copy.get_ref()).map_err(|m| {
                    self.err(copy.span(), m)
                        .with_hint("with `from`, `copy` takes an absolute path in that stage's image")
                })?;
                p
            } else {
                normalize_context_path(copy.get_ref()).map_err(|m| {
                    self.err(copy.span(), m).with_hint(
                        "`copy` takes a path relative to the context (the recipe's folder unless `--context`)",
                    )
                })?
            };
            let (dest, to_is_dir) = normalize_image_path(to.get_ref()).map_err(|m| {
                self.err(to.span(), m).with_hint("`to` is an absolute path in the image, e.g. `/app`")
            })?;
            let mut exclude = Vec::new();
            if let Some(list) = &s.exclude {
                if from.is_some() {
                    return Err(self
                        .err(list.span(), "`exclude` applies to copies from the context")
                        .with_hint(
                        "copy the files you want out of the stage, or leave them out of the stage's image",
                    ));
                }
                for pat in list.get_ref() {
                    let why = exclude_problem(pat.get_ref());
                    if let Some(why) = why {
                        return Err(self.err(pat.span(), why).with_hint(
                            "patterns are gitignore lines relative to the copied folder, e.g. `\"target/\"`, `\"*.log\"`, `\"!keep.log\"`",
                        ));
                    }
                    exclude.push(pat.get_ref().clone());
                }
            }
            return Ok(StepKind::Copy(CopyStep {
                src,
                from,
                src_span: copy.span(),
                to: dest,
                to_is_dir,
                owner,
                mode,
                exclude,
            }));
        }

        let write = s.write.expect("one kind is set");
        if let Some(to) = &s.to {
            return Err(self
                .err(to.span(), "`to` belongs to `copy` steps")
                .with_hint("a `write` step names its file in `write = \"/path\"`"));
        }
        if let Some(from) = &s.from {
            return Err(self.err(from.span(), "`from` belongs to `copy` steps"));
        }
        let content = s.content.ok_or_else(|| {
            self.err(write.span(), "a `write` step needs `content`")
                .with_hint("add `content = \"...\"` (use `content = \"\"` for an empty file)")
        })?;
        let (path, trailing) = normalize_image_path(write.get_ref()).map_err(|m| {
            self.err(write.span(), m).with_hint("`write` takes an absolute file path in the image")
        })?;
        if trailing || path == "/" {
            return Err(self
                .err(write.span(), "`write` names a folder, not a file")
                .with_hint("name the file, e.g. `write = \"/etc/motd\"`"));
        }
        Ok(StepKind::Write(WriteStep {
            path,
            content: content.into_inner(),
            owner,
            mode: mode.unwrap_or(FileMode(0o644)),
        }))
    }

    fn run_step(&self, s: RawStep) -> Result<StepKind, RecipeError> {
        let run = s.run.expect("a run step");
        for (key, sp) in [
            ("from", s.from.as_ref().map(|v| v.span())),
            ("to", s.to.as_ref().map(|v| v.span())),
            ("content", s.content.as_ref().map(|v| v.span())),
            ("owner", s.owner.as_ref().map(|v| v.span())),
            ("mode", s.mode.as_ref().map(|v| v.span())),
        ] {
            if let Some(sp) = sp {
                return Err(self.err(sp, format!("`{key}` does not apply to `run` steps")).with_hint(
                    format!("remove `{key}`; a `run` step's changes are whatever its command does"),
                ));
            }
        }
        let hint = "write `run` as a shell command string, e.g. `run = \"make install\"`, or as an array for exec form, e.g. `run = [\"/bin/app\", \"--init\"]`";
        let command = match run.get_ref() {
            toml::Value::String(c) if !c.trim().is_empty() => Command::Shell(c.clone()),
            toml::Value::Array(items) if !items.is_empty() => Command::Exec(
                items
                    .iter()
                    .map(|i| match i {
                        toml::Value::String(v) => Ok(v.clone()),
                        _ => Err(self.err(run.span(), "`run` must hold only strings").with_hint(hint)),
                    })
                    .collect::<Result<_, _>>()?,
            ),
            toml::Value::String(_) | toml::Value::Array(_) => {
                return Err(self.err(run.span(), "`run` is empty").with_hint(hint))
            }
            _ => {
                return Err(self
                    .err(run.span(), "`run` must be a string or an array of strings")
                    .with_hint(hint))
            }
        };
        let env = match s.env {
            None => BTreeMap::new(),
            Some(e) => {
                if let Some(why) = e.get_ref().iter().find_map(|(k, v)| env_problem(k, v)) {
                    return Err(self.err(e.span(), why).with_hint(
                        "names must be non-empty and contain no `=`; names and values no NUL byte",
                    ));
                }
                e.into_inner()
            }
        };
        let mut secrets: Vec<SecretUse> = Vec::new();
        if let Some(list) = &s.secrets {
            for item in list.get_ref() {
                let secret = self.secret_use(item)?;
                if secrets.iter().any(|o| o.id == secret.id) {
                    return Err(self
                        .err(item.span(), format!("the secret `{}` is listed twice", secret.id))
                        .with_hint("list each secret once"));
                }
                secrets.push(secret);
            }
        }
        let user = match s.user {
            Some(u) if u.get_ref().is_empty() => {
                return Err(self
                    .err(u.span(), "`user` is empty")
                    .with_hint("e.g. `user = \"0:0\"` or `user = \"app\"`"))
            }
            u => u.map(|u| u.into_inner()),
        };
        let workdir = match s.workdir {
            None => None,
            Some(w) => Some(
                normalize_image_path(w.get_ref())
                    .map_err(|m| {
                        self.err(w.span(), m).with_hint("`workdir` is an absolute path, e.g. `/src`")
                    })?
                    .0,
            ),
        };
        let timeout = match s.timeout {
            None => None,
            Some(t) => Some(crate::recipe::parse_duration(t.get_ref()).ok_or_else(|| {
                self.err(t.span(), "`timeout` is not a duration kiln reads").with_hint(
                    "a whole number and a unit (`ms`, `s`, `m`, `h`), or several: `timeout = \"90s\"`, `\"10m\"`, `\"1h30m\"` (at most a week)",
                )
            })?),
        };
        let cache = match s.cache {
            None => Vec::new(),
            Some(list) => self.cache_mounts(list.into_inner())?,
        };
        Ok(StepKind::Run(RunStep {
            command,
            env,
            network: s.network.map(|n| n.into_inner()).unwrap_or(false),
            secrets,
            user,
            workdir,
            timeout,
            cache,
        }))
    }

    /// A `run` step's `cache = [...]`.
    fn cache_mounts(
        &self,
        list: Vec<Spanned<crate::raw::RawCacheMount>>,
    ) -> Result<Vec<CacheMount>, RecipeError> {
        let mut out: Vec<CacheMount> = Vec::new();
        for m in list {
            let m = m.into_inner();
            let (target, _) = normalize_image_path(m.target.get_ref()).map_err(|why| {
                self.err(m.target.span(), format!("the cache mount's `target`: {why}")).with_hint(
                    "`target` is an absolute path in the image, e.g. `target = \"/root/.cache/pip\"`",
                )
            })?;
            // What the sandbox mounts itself, and the folders above it: a cache
            // there would cover it, or steer where it lands.
            let reserved =
                ["/proc", "/sys", "/dev", "/run/secrets", "/etc/hosts", "/etc/hostname", "/etc/resolv.conf"];
            let within = |a: &str, b: &str| a == b || a.strip_prefix(b).is_some_and(|r| r.starts_with('/'));
            if target == "/" || reserved.iter().any(|r| within(&target, r) || within(r, &target)) {
                return Err(self
                    .err(m.target.span(), format!("`{target}` cannot be a cache mount"))
                    .with_hint("mount a cache on a folder of its own, e.g. `/root/.cache/pip` or `/var/cache/apt`; not `/`, `/etc`, `/run`, `/proc`, `/sys`, `/dev` or what is in them that the sandbox provides"));
            }
            if out.iter().any(|o| o.target == target) {
                return Err(self
                    .err(m.target.span(), format!("two cache mounts have the target `{target}`"))
                    .with_hint("mount each folder once"));
            }
            let inside = |a: &str, b: &str| a.strip_prefix(b).is_some_and(|r| r.starts_with('/'));
            if let Some(o) = out.iter().find(|o| inside(&target, &o.target) || inside(&o.target, &target)) {
                return Err(self
                    .err(
                        m.target.span(),
                        format!("the cache mounts `{target}` and `{}` are one inside the other", o.target),
                    )
                    .with_hint("give each cache mount a folder of its own, side by side"));
            }
            let id = match &m.id {
                None => target.clone(),
                Some(id) => {
                    let v = id.get_ref();
                    if v.is_empty() || v.len() > 256 || v.chars().any(char::is_control) {
                        return Err(self
                            .err(id.span(), "a cache mount's `id` must be 1 to 256 characters, none of them control characters")
                            .with_hint("e.g. `id = \"pip\"`; steps with the same id share the cache"));
                    }
                    v.clone()
                }
            };
            let sharing = match &m.sharing {
                None => Sharing::Shared,
                Some(s) => match s.get_ref().as_str() {
                    "shared" => Sharing::Shared,
                    "locked" => Sharing::Locked,
                    "private" => Sharing::Private,
                    other => {
                        return Err(self.err(s.span(), format!("`{other}` is not a sharing mode")).with_hint(
                            "`sharing` is `shared` (the default), `locked` or `private`, as in BuildKit",
                        ))
                    }
                },
            };
            if out.iter().any(|o| o.id == id) {
                let at = m.id.as_ref().map(|i| i.span()).unwrap_or_else(|| m.target.span());
                return Err(self
                    .err(at, format!("two cache mounts of this step are the cache `{}`", id.escape_debug()))
                    .with_hint("a step mounts each cache once; give the other its own `id`"));
            }
            out.push(CacheMount { target, id, sharing });
        }
        Ok(out)
    }

    /// One of a step's `secrets`: `"ID"`, or `{ id, uid, gid, mode }`.
    fn secret_use(&self, item: &Spanned<toml::Value>) -> Result<SecretUse, RecipeError> {
        let form = "write `\"ID\"` or `{ id = \"ID\", uid = 1000, gid = 1000, mode = \"0440\" }` (uid, gid and mode optional: the step's user and 0400 by default)";
        let bad_id = |id: &str| {
            // Never echoed when it is not a plain name: the value is the recipe author's.
            let shown = if id.len() <= 64 && !id.chars().any(char::is_control) { id } else { "..." };
            self.err(item.span(), format!("`{shown}` is not a valid secret id")).with_hint(
                "secret ids are letters, digits, `.`, `_` and `-`; the secret is mounted at `/run/secrets/ID`",
            )
        };
        let (id, table) = match item.get_ref() {
            toml::Value::String(id) => (id.clone(), None),
            toml::Value::Table(t) => match t.get("id") {
                Some(toml::Value::String(id)) => (id.clone(), Some(t)),
                _ => {
                    return Err(self.err(item.span(), "this secret has no `id` string").with_hint(form));
                }
            },
            _ => return Err(self.err(item.span(), "a secret is an id or a table").with_hint(form)),
        };
        if !is_secret_id(&id) {
            return Err(bad_id(&id));
        }
        let mut out = SecretUse { id, uid: None, gid: None, mode: None };
        for (k, v) in table.into_iter().flatten() {
            let number = |what: &str| match v {
                toml::Value::Integer(n) => {
                    u32::try_from(*n).ok().filter(|n| *n != u32::MAX).ok_or_else(|| {
                        self.err(item.span(), format!("the secret's `{what}` is not a user or group id"))
                            .with_hint("ids are whole numbers from 0 to 4294967294")
                    })
                }
                _ => Err(self
                    .err(item.span(), format!("the secret's `{what}` must be a number"))
                    .with_hint(format!("e.g. `{what} = 1000`"))),
            };
            match k.as_str() {
                "id" => {}
                "uid" => out.uid = Some(number("uid")?),
                "gid" => out.gid = Some(number("gid")?),
                "mode" => {
                    let toml::Value::String(text) = v else {
                        return Err(self
                            .err(item.span(), "the secret's `mode` must be a string")
                            .with_hint("write it in octal, e.g. `mode = \"0440\"`"));
                    };
                    let digits = text.strip_prefix("0o").unwrap_or(text);
                    match u32::from_str_radix(digits, 8) {
                        Ok(m) if m <= 0o777 && !digits.is_empty() => out.mode = Some(m),
                        _ => {
                            return Err(self
                                .err(item.span(), "the secret's `mode` is not a permission mode")
                                .with_hint("an octal mode up to 0777, e.g. `mode = \"0440\"` (no setuid, setgid or sticky bits)"))
                        }
                    }
                }
                other => {
                    let shown =
                        if other.len() <= 64 && !other.chars().any(char::is_control) { other } else { "..." };
                    return Err(self
                        .err(item.span(), format!("a secret has no key `{shown}`"))
                        .with_hint(form));
                }
            }
        }
        Ok(out)
    }

    fn owner(&self, o: &Spanned<String>) -> Result<Owner, RecipeError> {
        let bad = || {
            self.err(o.span(), format!("`{}` is not an owner", o.get_ref()))
                .with_hint("write numeric ids as `\"UID:GID\"`, e.g. `owner = \"1000:1000\"`; names need a passwd file kiln does not read")
        };
        let (u, g) = o.get_ref().split_once(':').ok_or_else(bad)?;
        let uid = u.parse::<u32>().map_err(|_| bad())?;
        let gid = g.parse::<u32>().map_err(|_| bad())?;
        Ok(Owner { uid, gid })
    }

    fn mode(&self, m: &Spanned<toml::Value>) -> Result<FileMode, RecipeError> {
        let hint = "write modes as octal strings, e.g. `mode = \"0644\"` or `mode = \"0755\"`";
        let toml::Value::String(s) = m.get_ref() else {
            return Err(self.err(m.span(), "`mode` must be a string").with_hint(hint));
        };
        let digits = s.strip_prefix("0o").unwrap_or(s);
        match u32::from_str_radix(digits, 8) {
            Ok(v) if v <= 0o7777 && !digits.is_empty() => Ok(FileMode(v)),
            _ => Err(self.err(m.span(), format!("`{s}` is not a file mode")).with_hint(hint)),
        }
    }

    fn config(&self, c: RawConfig) -> Result<Config, RecipeError> {
        let argv = |v: &Option<Spanned<toml::Value>>,
                    key: &str|
         -> Result<Option<Vec<String>>, RecipeError> {
            let Some(v) = v else { return Ok(None) };
            let hint =
                format!("write `{key}` as an array of strings, e.g. `{key} = [\"/bin/app\", \"--flag\"]`");
            match v.get_ref() {
                toml::Value::Array(items) => items
                    .iter()
                    .map(|i| match i {
                        toml::Value::String(s) => Ok(s.clone()),
                        _ => Err(self
                            .err(v.span(), format!("`{key}` must hold only strings"))
                            .with_hint(hint.clone())),
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map(Some),
                toml::Value::String(_) => Err(self
                    .err(v.span(), format!("`{key}` must be an array"))
                    .with_hint(format!("{hint}; for a shell command use `[\"/bin/sh\", \"-c\", \"...\"]`"))),
                _ => Err(self.err(v.span(), format!("`{key}` must be an array of strings")).with_hint(hint)),
            }
        };
        let entrypoint = argv(&c.entrypoint, "entrypoint")?;
        let cmd = argv(&c.cmd, "cmd")?;
        let shell = argv(&c.shell, "shell")?;
        if let (Some(sh), Some(span)) = (&shell, c.shell.as_ref().map(|s| s.span())) {
            if sh.is_empty() || sh[0].is_empty() {
                return Err(self
                    .err(span, "`shell` names no program")
                    .with_hint("e.g. `shell = [\"/bin/bash\", \"-c\"]`"));
            }
        }
        let healthcheck = c.healthcheck.map(|h| self.healthcheck(h)).transpose()?;

        let mut env = BTreeMap::new();
        for (k, v) in c.env {
            if let Some(why) = env_problem(&k, v.get_ref()) {
                return Err(self
                    .err(v.span(), why)
                    .with_hint("names must be non-empty and contain no `=`; names and values no NUL byte"));
            }
            env.insert(k, v.into_inner());
        }
        let workdir = match c.workdir {
            None => None,
            Some(w) => Some(
                normalize_image_path(w.get_ref())
                    .map_err(|m| {
                        self.err(w.span(), m).with_hint("`workdir` is an absolute path, e.g. `/app`")
                    })?
                    .0,
            ),
        };
        let user = match c.user {
            Some(u) if u.get_ref().is_empty() => {
                return Err(self
                    .err(u.span(), "`user` is empty")
                    .with_hint("e.g. `user = \"1000:1000\"` or `user = \"app\"`"))
            }
            u => u.map(|u| u.into_inner()),
        };
        let mut ports = Vec::new();
        for p in c.ports {
            let s = p.get_ref();
            let (num, proto) = s.split_once('/').unwrap_or((s, "tcp"));
            let ok = num.parse::<u16>().is_ok_and(|n| n > 0) && matches!(proto, "tcp" | "udp" | "sctp");
            if !ok {
                return Err(self
                    .err(p.span(), format!("`{s}` is not a port"))
                    .with_hint("write ports as `\"8080/tcp\"`, `\"53/udp\"` or `\"8080\"`"));
            }
            ports.push(format!("{num}/{proto}"));
        }
        let mut volumes = Vec::new();
        for v in c.volumes {
            let (p, _) = normalize_image_path(v.get_ref())
                .map_err(|m| self.err(v.span(), m).with_hint("volumes are absolute paths, e.g. `/data`"))?;
            volumes.push(p);
        }
        ports.sort();
        ports.dedup();
        volumes.sort();
        volumes.dedup();
        Ok(Config {
            entrypoint,
            cmd,
            env,
            workdir,
            user,
            labels: c.labels.into_iter().map(|(k, v)| (k, v.into_inner())).collect(),
            ports,
            volumes,
            healthcheck,
            shell,
            stop_signal: match c.stop_signal {
                Some(sig) if !is_signal(sig.get_ref()) => {
                    return Err(self
                        .err(sig.span(), format!("`{}` is not a signal", sig.get_ref()))
                        .with_hint(
                            "write a signal name such as `SIGTERM`, `SIGINT` or `SIGRTMIN+3`, or its number",
                        ))
                }
                s => s.map(|s| s.into_inner()),
            },
        })
    }
}

const ANNOTATION_HINT: &str = "annotation keys are reverse-DNS names such as `org.opencontainers.image.source`; kiln sets `org.opencontainers.image.created` itself (the epoch)";

/// What is wrong with a manifest annotation, if anything.
pub fn annotation_problem(key: &str, value: &str) -> Option<String> {
    let key_ok = !key.is_empty()
        && key.len() <= 256
        && key.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_' | b'/'));
    if !key_ok {
        Some(format!("`{}` is not an annotation key", key.escape_debug()))
    } else if key == "org.opencontainers.image.created" {
        Some("`org.opencontainers.image.created` is the image's epoch; kiln writes it".into())
    } else if key == "org.opencontainers.image.ref.name" {
        Some(
            "`org.opencontainers.image.ref.name` is the tag of an `oci:DIR:TAG` output; kiln writes it"
                .into(),
        )
    } else if value.contains('\0') {
        Some(format!("the value of `{key}` contains a NUL byte"))
    } else {
        None
    }
}

impl Parser {
    /// `healthcheck = { test = [...], interval = "30s", ... }`, as `HEALTHCHECK` takes it.
    fn healthcheck(&self, h: Spanned<crate::raw::RawHealthcheck>) -> Result<Healthcheck, RecipeError> {
        let span = h.span();
        let h = h.into_inner();
        let hint = "write `test = [\"CMD\", \"/bin/check\", \"--quick\"]`, `[\"CMD-SHELL\", \"curl -f http://localhost/ || exit 1\"]`, a string (run with the image's shell), or `[\"NONE\"]` to turn off the base's";
        let test = match h.test.get_ref() {
            toml::Value::String(s) if !s.trim().is_empty() => vec!["CMD-SHELL".to_string(), s.clone()],
            toml::Value::Array(items) => {
                let v: Option<Vec<String>> = items.iter().map(|i| i.as_str().map(str::to_string)).collect();
                let Some(v) = v else {
                    return Err(self.err(h.test.span(), "`test` must hold only strings").with_hint(hint));
                };
                let ok = match v.first().map(String::as_str) {
                    Some("NONE") => v.len() == 1,
                    Some("CMD") => v.len() >= 2 && !v[1].is_empty(),
                    Some("CMD-SHELL") => v.len() == 2 && !v[1].trim().is_empty(),
                    _ => false,
                };
                if !ok {
                    return Err(self
                        .err(h.test.span(), "`test` is not a health check command")
                        .with_hint(hint));
                }
                v
            }
            _ => return Err(self.err(h.test.span(), "`test` is empty or not a command").with_hint(hint)),
        };
        let duration = |d: &Option<Spanned<String>>, key: &str| -> Result<_, RecipeError> {
            d.as_ref()
                .map(|d| {
                    crate::recipe::parse_duration(d.get_ref()).ok_or_else(|| {
                        self.err(d.span(), format!("`{key}` is not a duration kiln reads")).with_hint(
                            "a whole number and a unit (`ms`, `s`, `m`, `h`), e.g. `\"30s\"` or `\"1m30s\"`",
                        )
                    })
                })
                .transpose()
        };
        let retries = match &h.retries {
            None => None,
            Some(r) => Some(u32::try_from(*r.get_ref()).ok().filter(|n| *n <= 1000).ok_or_else(|| {
                self.err(r.span(), "`retries` must be a whole number from 0 to 1000")
                    .with_hint("e.g. `retries = 3`")
            })?),
        };
        if test == ["NONE"] && (h.interval.is_some() || h.timeout.is_some() || h.retries.is_some()) {
            return Err(self
                .err(span, "a `[\"NONE\"]` health check takes no other keys")
                .with_hint("`[\"NONE\"]` turns the base's check off; remove the other keys"));
        }
        Ok(Healthcheck {
            test,
            interval: duration(&h.interval, "interval")?,
            timeout: duration(&h.timeout, "timeout")?,
            start_period: duration(&h.start_period, "start_period")?,
            start_interval: duration(&h.start_interval, "start_interval")?,
            retries,
        })
    }
}

/// `512M`, `2G`, `1.5G`, `1048576`: bytes (binary units).
fn parse_disk_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        _ => return None,
    };
    let bytes = n * mult as f64;
    (bytes.is_finite() && bytes >= 0.0 && bytes < 2f64.powi(50) && bytes.fract() == 0.0)
        .then_some(bytes as u64)
}

/// How a key's value is written, for the hint of a wrong type.
fn key_example(key: &str) -> Option<&'static str> {
    Some(match key {
        "user" => "user = \"1000:1000\"",
        "owner" => "owner = \"0:0\"",
        "mode" => "mode = \"0644\"",
        "ports" => "ports = [\"80/tcp\"]",
        "epoch" => "epoch = 0",
        "network" => "network = true",
        "env" => "env = { LANG = \"C.UTF-8\" }",
        "labels" => "labels = { \"org.opencontainers.image.title\" = \"app\" }",
        "entrypoint" => "entrypoint = [\"/app/server\"]",
        "cmd" => "cmd = [\"--port\", \"8080\"]",
        "run" => "run = \"make install\"",
        "timeout" => "timeout = \"10m\"",
        "include" => "include = [\"ca-certificates\"]",
        "secrets" => "secrets = [\"npmrc\"]",
        "volumes" => "volumes = [\"/data\"]",
        "workdir" => "workdir = \"/app\"",
        "name" => "name = \"app\"",
        "base" => "base = \"scratch\"",
        "image" => "[image] with name = \"app\"",
        _ => return None,
    })
}

/// serde's words for types in what a recipe author reads: kiln's own type
/// names (`struct RawImage`) and Rust's (`i64`) become TOML's.
fn readable_type_error(message: &str) -> String {
    let Some((head, expected)) = message.split_once(", expected ") else { return message.to_string() };
    if !head.starts_with("invalid type") {
        return message.to_string();
    }
    let expected = expected.trim();
    let toml_word = if expected.starts_with("struct ") || expected == "a map" {
        "a table"
    } else if matches!(expected, "i64" | "u64" | "i32" | "u32" | "u16" | "u8" | "usize" | "an integer") {
        "a whole number"
    } else if expected == "a sequence" {
        "an array"
    } else if expected == "a boolean" {
        "`true` or `false`"
    } else if expected.starts_with("a string") {
        "a string"
    } else {
        expected
    };
    let head = head
        .replace("invalid type: map", "invalid type: a table")
        .replace("invalid type: sequence", "invalid type: an array")
        .replace("invalid type: integer", "invalid type: a number")
        .replace("invalid type: string", "invalid type: the string")
        .replace("invalid type: boolean", "invalid type: a boolean");
    format!("{}, expected {toml_word}", head.replacen("invalid type: ", "this is ", 1))
}

/// Secret ids become a file name under `/run/secrets`.
fn is_secret_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// A Debian package name (policy §5.6.1).
fn is_package_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() >= 2
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'+' | b'-' | b'.'))
}

/// A suite, component or architecture: one word that is safe in a URL path.
/// Puts `[packages]` (and its maintainer scripts, unless `scripts = false`)
/// below a target's steps.
fn put_packages(steps: &mut Vec<Step>, p: Packages, span: Span) {
    let mut first = vec![Step { index: 0, span: span.clone(), kind: StepKind::Packages(p.clone()) }];
    if p.scripts {
        first.push(Step { index: 1, span, kind: StepKind::Configure(p) });
    }
    for s in steps.iter_mut() {
        s.index += first.len();
    }
    steps.splice(0..0, first);
}

fn is_debian_word(w: &str) -> bool {
    !w.is_empty()
        && w.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && w != ".."
        && w != "."
}

fn is_valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-'))
}

/// A path in the context: relative, no `..`; `""` and `.` mean the whole context.
pub(crate) fn normalize_context_path(p: &str) -> Result<String, String> {
    if p.is_empty() {
        return Err("`copy` is empty; write `.` to copy the whole context".into());
    }
    if p.contains('\0') {
        return Err("the path contains a NUL byte".into());
    }
    if p.starts_with('/') {
        return Err(format!("`{p}` is an absolute path; `copy` reads only from the context"));
    }
    let mut parts = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(format!("`{p}` leaves the context through `..`")),
            c => parts.push(c),
        }
    }
    Ok(if parts.is_empty() { ".".into() } else { parts.join("/") })
}

/// What is wrong with an `exclude` pattern, if anything: it must be a
/// gitignore line that matches inside the copied folder.
fn exclude_problem(p: &str) -> Option<String> {
    let body = p.strip_prefix('!').unwrap_or(p);
    if body.trim().is_empty() {
        Some("an `exclude` pattern is empty".into())
    } else if p.contains(['\0', '\n', '\r']) {
        Some("an `exclude` pattern holds a NUL byte or a line break".into())
    } else if p.starts_with('#') {
        Some(format!(
            "`{p}` would be a comment in gitignore syntax; write `\\#` for a name starting with `#`"
        ))
    } else if p.len() > 4096 {
        Some("an `exclude` pattern is longer than 4096 bytes".into())
    } else if body.split('/').any(|c| c == "..") {
        Some(format!("`{p}` leaves the copied folder through `..`; patterns match inside it"))
    } else {
        None
    }
}

/// What is wrong with an environment variable, if anything (the engine and
/// the kernel refuse a NUL byte; a name cannot hold `=`).
fn env_problem(name: &str, value: &str) -> Option<String> {
    if name.is_empty() || name.contains('=') || name.contains('\0') {
        Some(format!("`{}` is not a valid environment variable name", name.escape_debug()))
    } else if value.contains('\0') {
        Some(format!("the value of `{name}` contains a NUL byte"))
    } else {
        None
    }
}

/// A stop signal as the engine takes it: `SIGNAME`, `NAME`, `SIGRTMIN+N`,
/// `SIGRTMAX-N` or a number from 1 to 64.
fn is_signal(s: &str) -> bool {
    const NAMES: &[&str] = &[
        "HUP", "INT", "QUIT", "ILL", "TRAP", "ABRT", "IOT", "BUS", "FPE", "KILL", "USR1", "SEGV", "USR2",
        "PIPE", "ALRM", "TERM", "STKFLT", "CHLD", "CONT", "STOP", "TSTP", "TTIN", "TTOU", "URG", "XCPU",
        "XFSZ", "VTALRM", "PROF", "WINCH", "IO", "POLL", "PWR", "SYS", "RTMIN", "RTMAX",
    ];
    if let Ok(n) = s.parse::<u32>() {
        return (1..=64).contains(&n);
    }
    let name = s.strip_prefix("SIG").unwrap_or(s);
    if NAMES.contains(&name) {
        return true;
    }
    let offset = |base: &str, sep: char| {
        name.strip_prefix(base)
            .and_then(|r| r.strip_prefix(sep))
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|n| (1..=30).contains(&n))
    };
    offset("RTMIN", '+') || offset("RTMAX", '-')
}

/// An absolute path in the image, normalized; also whether it ended in `/`.
pub(crate) fn normalize_image_path(p: &str) -> Result<(String, bool), String> {
    if !p.starts_with('/') {
        return Err(format!("`{p}` is not an absolute path"));
    }
    if p.contains('\0') {
        return Err("the path contains a NUL byte".into());
    }
    // What a layer (and kiln's own reader) holds: PATH_MAX and NAME_MAX.
    if p.len() > 4096 {
        return Err(format!("the path is {} bytes long; image paths are at most 4096", p.len()));
    }
    let mut parts = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(format!("`{p}` contains `..`; write the path it means")),
            c if c.len() > 255 => {
                return Err(format!("a name in the path is {} bytes long; names are at most 255", c.len()))
            }
            c => parts.push(c),
        }
    }
    let trailing = p.len() > 1 && (p.ends_with('/') || p.ends_with("/."));
    Ok((format!("/{}", parts.join("/")), trailing))
}

/// For `unknown field `x`, expected one of `a`, `b``: the closest expected name.
fn unknown_field_hint(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    let (field, rest) = rest.split_once('`')?;
    let expected: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
    let best = expected
        .iter()
        .map(|e| (edit_distance(field, e), *e))
        .min()
        .filter(|(d, e)| *d <= 2.max(e.len() / 3))?;
    Some(format!("did you mean `{}`?", best.1))
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Recipe, RecipeError> {
        parse_str("kiln.toml", text.to_string(), Path::new("/ctx"))
    }

    #[test]
    fn parses_a_full_recipe() {
        let r = parse(
            r#"
[image]
name = "hello"
epoch = 5
platform = "linux/arm64"

[[step]]
copy = "./src/"
to = "/app/src/"
owner = "1000:1000"

[[step]]
write = "/etc/motd"
content = "hi\n"
mode = "0600"

[config]
entrypoint = ["/app/hello"]
env = { B = "2", A = "1" }
ports = ["8080", "53/udp"]
"#,
        )
        .unwrap();
        assert_eq!(r.image.name, "hello");
        assert_eq!(r.image.epoch, Some(5));
        assert_eq!(r.image.platform.as_ref().unwrap().to_string(), "linux/arm64");
        let StepKind::Copy(c) = &r.steps[0].kind else { panic!() };
        assert_eq!((c.src.as_str(), c.to.as_str(), c.to_is_dir), ("src", "/app/src", true));
        assert_eq!(c.owner, Owner { uid: 1000, gid: 1000 });
        let StepKind::Write(w) = &r.steps[1].kind else { panic!() };
        assert_eq!(w.mode, FileMode(0o600));
        assert_eq!(r.config.ports, vec!["53/udp", "8080/tcp"]);
        assert_eq!(r.config.env.keys().collect::<Vec<_>>(), vec!["A", "B"]);
    }

    #[test]
    fn unknown_key_names_line_column_and_suggests() {
        let e = parse("[image]\nname = \"x\"\n\n[[step]]\ncopy = \"a\"\ntoo = \"/b\"\n").unwrap_err();
        assert!(e.location().starts_with("kiln.toml:6:"), "{}", e.location());
        assert!(e.message().contains("unknown field `too`"), "{}", e.message());
        assert_eq!(e.hint(), Some("did you mean `to`?"));
    }

    #[test]
    fn wrong_type_is_located() {
        let e = parse("[image]\nname = 5\n").unwrap_err();
        assert!(e.location().starts_with("kiln.toml:2:"), "{}", e.location());
    }

    #[test]
    fn invalid_toml_is_located() {
        let e = parse("[image\nname = \"x\"\n").unwrap_err();
        assert!(e.location().starts_with("kiln.toml:1:"), "{}", e.location());
    }

    #[test]
    fn copy_sources_stay_in_the_context() {
        for bad in ["../x", "a/../../x", "/etc/passwd"] {
            let e = parse(&format!("[image]\nname = \"x\"\n[[step]]\ncopy = \"{bad}\"\nto = \"/x\"\n"))
                .unwrap_err();
            assert!(e.location().starts_with("kiln.toml:4:8"), "{bad}: {}", e.location());
        }
    }

    #[test]
    fn durations_read_as_written() {
        use crate::recipe::parse_duration;
        use std::time::Duration;
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("10m"), Some(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        for bad in ["", "soon", "10", "m", "1.5h", "-1s", "0s", "8d", "169h", "1 h", "9999999999s"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn bad_values_are_refused() {
        let cases = [
            ("[image]\nname = \"Hello\"\n", "not a valid image name"),
            ("[image]\nname = \"x\"\nepoch = -1\n", "negative"),
            ("[image]\nname = \"x\"\n[[step]]\nrun = \"true\"\ntimeout = \"soon\"\n", "`timeout` is not a duration"),
            ("[image]\nname = \"x\"\n[[step]]\nrun = \"true\"\ntimeout = \"0s\"\n", "`timeout` is not a duration"),
            ("[image]\nname = \"x\"\n[[step]]\nwrite = \"/a\"\ncontent = \"\"\ntimeout = \"1s\"\n", "`timeout` only applies to `run` steps"),
            ("[image]\nname = \"x\"\nepoch = 253402300800\n", "past the year 9999"),
            ("[image]\nname = \"x\"\n[[step]]\ncopy = \"\"\nto = \"/a\"\n", "`copy` is empty"),
            ("[image]\nname = \"x\"\n[config]\nstop_signal = \"SIGFOO\"\n", "`SIGFOO` is not a signal"),
            ("[image]\nname = \"x\"\n[config]\nenv = { \"A\\u0000B\" = \"1\" }\n", "not a valid environment variable name"),
            ("[image]\nname = \"x\"\n[[step]]\nrun = \"true\"\nenv = { A = \"x\\u0000y\" }\n", "contains a NUL byte"),
            ("[image]\nname = \"x\"\nplatform = \"windows/amd64\"\n", "not supported"),
            (
                "[image]\nname = \"x\"\n[[step]]\nwrite = \"/a\"\ncontent = \"\"\nmode = 644\n",
                "must be a string",
            ),
            (
                "[image]\nname = \"x\"\n[[step]]\nwrite = \"/a\"\ncontent = \"\"\nmode = \"0999\"\n",
                "not a file mode",
            ),
            (
                "[image]\nname = \"x\"\n[[step]]\nwrite = \"/a\"\ncontent = \"\"\nowner = \"root\"\n",
                "not an owner",
            ),
            ("[image]\nname = \"x\"\n[[step]]\ncopy = \"a\"\n", "needs `to`"),
            ("[image]\nname = \"x\"\n[[step]]\ncopy = \"a\"\nto = \"rel\"\n", "not an absolute path"),
            ("[image]\nname = \"x\"\n[[step]]\nrun = \"\"\n", "`run` is empty"),
            ("[image]\nname = \"x\"\n[[step]]\nrun = 5\n", "must be a string or an array"),
            ("[image]\nname = \"x\"\n[[step]]\nrun = \"x\"\nsecrets = [\"../a\"]\n", "not a valid secret id"),
            ("[image]\nname = \"x\"\n[[step]]\nrun = \"x\"\nsecrets = [{ id = \"../a\" }]\n", "not a valid secret id"),
            ("[image]\nname = \"x\"\n[[step]]\nrun = \"x\"\nsecrets = [{ uid = 1 }]\n", "has no `id` string"),
            ("[image]\nname = \"x\"\n[[step]]\nrun = \"x\"\nsecrets = [5]\n", "is an id or a table"),
            ("[image]\nname = \"x\"\n[[step]]\nrun = \"x\"\nsecrets = [{ id = \"a\", uid = -1 }]\n", "not a user or group id"),
            ("[image]\nname = \"x\"\n[[step]]\nrun = \"x\"\nsecrets = [{ id = \"a\", gid = \"x\" }]\n", "must be a number"),
            ("[image]\nname = \"x\"\n[[step]]\nrun = \"x\"\nsecrets = [{ id = \"a\", mode = \"4755\" }]\n", "not a permission mode"),
            ("[image]\nname = \"x\"\n[[step]]\nrun = \"x\"\nsecrets = [{ id = \"a\", mode = 256 }]\n", "must be a string"),
            ("[image]\nname = \"x\"\n[[step]]\nrun = \"x\"\nsecrets = [{ id = \"a\", owner = 1 }]\n", "no key `owner`"),
            ("[image]\nname = \"x\"\n[[step]]\nrun = \"x\"\nsecrets = [\"a\", { id = \"a\" }]\n", "listed twice"),
            ("[image]\nname = \"x\"\n[[step]]\nrun = \"x\"\nto = \"/a\"\n", "does not apply to `run`"),
            ("[image]\nname = \"x\"\nbase = \"stage:b\"\n", "no stage named `b`"),
            ("[[stage]]\nname = \"a\"\nbase = \"stage:a\"\n[image]\nname = \"x\"\n", "no stage named `a`"),
            (
                "[[stage]]\nname = \"a\"\n[[stage]]\nname = \"a\"\n[image]\nname = \"x\"\n",
                "already a stage named",
            ),
            ("[image]\nname = \"x\"\n[[step]]\ncopy = \"/a\"\nfrom = \"b\"\nto = \"/a\"\n", "no stage named"),
            ("[image]\nname = \"x\"\n[config]\nentrypoint = \"/bin/sh\"\n", "must be an array"),
            ("[image]\nname = \"x\"\n[config]\nports = [\"http\"]\n", "not a port"),
            ("[image]\nname = \"x\"\nbase = \"nope:x\"\n", "unknown transport"),
            ("[[step]]\ncopy = \"a\"\nto = \"/a\"\n", "no `[image]`"),
            ("[image]\nname = \"x\"\n[packages]\ninclude = [\"a\"]\n", "has no `suite`"),
            ("[image]\nname = \"x\"\n[packages]\nsuite = \"bookworm\"\n", "has no `include`"),
            ("[image]\nname = \"x\"\n[packages]\nsuite = \"../x\"\ninclude = [\"a\"]\n", "not a suite name"),
            ("[image]\nname = \"x\"\n[packages]\nsuite = \"s\"\ninclude = [\"Python\"]\n", "not a Debian package name"),
            ("[image]\nname = \"x\"\n[packages]\nsuite = \"s\"\ninclude = [\"ab\", \"ab=1\"]\n", "listed twice"),
            ("[image]\nname = \"x\"\n[packages]\nsuite = \"s\"\ninclude = [\"ab\"]\nmirror = \"ftp://x\"\n", "not an http://"),
            ("[image]\nname = \"x\"\n[packages]\nsuite = \"s\"\ninclude = [\"ab\"]\nexclude = [\"a b\"]\n", "not a Debian package name"),
            ("[image]\nname = \"x\"\n[packages]\nsuite = \"s\"\ninclude = [\"ab\"]\nsuit = \"s\"\n", "unknown field"),
            ("[image]\nname = \"x\"\n[packages]\nsuite = \"s\"\nsuites = [\"s\"]\ninclude = [\"ab\"]\n", "both `suite` and `suites`"),
            ("[image]\nname = \"x\"\n[packages]\nsuites = []\ninclude = [\"ab\"]\n", "`suites` is empty"),
            ("[image]\nname = \"x\"\n[packages]\nsuites = [\"s\", \"s\"]\ninclude = [\"ab\"]\n", "listed twice"),
            ("[image]\nname = \"x\"\n[packages]\nsuites = [\"s/../../x\"]\ninclude = [\"ab\"]\n", "not a suite name"),
            ("[image]\nname = \"x\"\n[packages]\nsuites = [1]\ninclude = [\"ab\"]\n", "neither a name nor a table"),
            ("[image]\nname = \"x\"\n[packages]\nsuites = [{ mirror = \"http://m\" }]\ninclude = [\"ab\"]\n", "no `name`"),
            ("[image]\nname = \"x\"\n[packages]\nsuites = [{ name = \"s\", mirorr = \"http://m\" }]\ninclude = [\"ab\"]\n", "unknown key `mirorr`"),
            ("[image]\nname = \"x\"\n[packages]\nsuites = [{ name = \"s\", mirror = \"ftp://m\" }]\ninclude = [\"ab\"]\n", "not an http://"),
            ("[image]\nname = \"x\"\n[packages]\nsuite = \"s\"\ninclude = [\"ab\"]\nscripts = \"no\"\n", "expected `true` or `false`"),
            ("[[stage]]\nname = \"b\"\n[stage.packages]\nsuite = \"s\"\n[image]\nname = \"x\"\n", "`[stage.packages]` has no `include`"),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err();
            assert!(e.message().contains(want), "{text:?}: got {:?}", e.message());
        }
    }

    #[test]
    fn healthcheck_shell_and_annotations() {
        let r = parse(
            r#"
[image]
name = "x"
annotations = { "org.opencontainers.image.source" = "https://example.invalid/app" }
[config]
healthcheck = { test = ["CMD", "/bin/check", "--quick"], interval = "30s", timeout = "5s", retries = 3, start_period = "1m" }
shell = ["/bin/bash", "-c"]
"#,
        )
        .unwrap();
        let h = r.config.healthcheck.unwrap();
        assert_eq!(h.test, ["CMD", "/bin/check", "--quick"]);
        assert_eq!(h.interval, Some(std::time::Duration::from_secs(30)));
        assert_eq!(h.start_period, Some(std::time::Duration::from_secs(60)));
        assert_eq!((h.retries, h.start_interval), (Some(3), None));
        assert_eq!(r.config.shell.unwrap(), ["/bin/bash", "-c"]);
        assert_eq!(r.image.annotations["org.opencontainers.image.source"], "https://example.invalid/app");
        let r = parse("[image]\nname = \"x\"\n[config]\nhealthcheck = { test = \"curl -f localhost\" }\n")
            .unwrap();
        assert_eq!(r.config.healthcheck.unwrap().test, ["CMD-SHELL", "curl -f localhost"]);

        let head = "[image]\nname = \"x\"\n[config]\n";
        for (body, want) in [
            ("healthcheck = { test = [\"curl\"] }", "not a health check command"),
            ("healthcheck = { test = [\"CMD\"] }", "not a health check command"),
            ("healthcheck = { test = [\"NONE\", \"x\"] }", "not a health check command"),
            ("healthcheck = { test = [\"CMD\", 1] }", "must hold only strings"),
            ("healthcheck = { test = \"\" }", "`test` is empty"),
            ("healthcheck = { test = \"true\", interval = \"soon\" }", "`interval` is not a duration"),
            ("healthcheck = { test = \"true\", retries = -1 }", "`retries` must be"),
            ("healthcheck = { test = [\"NONE\"], retries = 1 }", "takes no other keys"),
            ("healthcheck = { test = \"true\", intervall = \"1s\" }", "unknown field"),
            ("healthcheck = { interval = \"1s\" }", "missing field `test`"),
            ("shell = []", "names no program"),
            ("shell = \"/bin/bash\"", "must be an array"),
        ] {
            let e = parse(&format!("{head}{body}\n")).unwrap_err();
            assert!(e.message().contains(want), "{body}: {}", e.message());
        }
        for (body, want) in [
            ("annotations = { \"a b\" = \"1\" }", "not an annotation key"),
            ("annotations = { \"org.opencontainers.image.created\" = \"2024\" }", "kiln writes it"),
            ("annotations = { \"org.opencontainers.image.ref.name\" = \"v1\" }", "kiln writes it"),
            ("annotations = { a = 1 }", "expected a string"),
        ] {
            let e = parse(&format!("[image]\nname = \"x\"\n{body}\n")).unwrap_err();
            assert!(e.message().contains(want), "{body}: {}", e.message());
        }
    }

    #[test]
    fn cache_mounts_parse_and_bad_ones_are_refused() {
        let r = parse(
            "[image]\nname = \"x\"\n[[step]]\nrun = \"true\"\ncache = [{ target = \"/root/.cache/pip/\" }, { id = \"apt\", target = \"/var/cache/apt\", sharing = \"locked\" }]\n",
        )
        .unwrap();
        let StepKind::Run(run) = &r.steps[0].kind else { panic!() };
        assert_eq!(
            run.cache,
            [
                CacheMount {
                    target: "/root/.cache/pip".into(),
                    id: "/root/.cache/pip".into(),
                    sharing: Sharing::Shared
                },
                CacheMount { target: "/var/cache/apt".into(), id: "apt".into(), sharing: Sharing::Locked },
            ]
        );
        let head = "[image]\nname = \"x\"\n[[step]]\nrun = \"true\"\n";
        for (body, want) in [
            ("cache = [{ target = \"root/.cache\" }]", "not an absolute path"),
            ("cache = [{ target = \"/a/../b\" }]", "contains `..`"),
            ("cache = [{ target = \"/\" }]", "cannot be a cache mount"),
            ("cache = [{ target = \"/proc/x\" }]", "cannot be a cache mount"),
            ("cache = [{ target = \"/run/secrets\" }]", "cannot be a cache mount"),
            ("cache = [{ target = \"/run\" }]", "cannot be a cache mount"),
            ("cache = [{ target = \"/etc\" }]", "cannot be a cache mount"),
            ("cache = [{ target = \"/a\" }, { target = \"/a/\" }]", "two cache mounts"),
            ("cache = [{ target = \"/a\", sharing = \"exclusive\" }]", "not a sharing mode"),
            ("cache = [{ target = \"/a\", id = \"\" }]", "`id` must be"),
            ("cache = [{ target = \"/a\", id = \"a\\nb\" }]", "`id` must be"),
            ("cache = [{ target = \"/a\", uid = 1 }]", "unknown field"),
            ("cache = [{ id = \"a\" }]", "missing field `target`"),
            ("cache = [{ target = \"/a\" }, { target = \"/a/b\" }]", "one inside the other"),
            ("cache = [{ target = \"/a/b\" }, { target = \"/a\" }]", "one inside the other"),
            (
                "cache = [{ id = \"s\", target = \"/a\" }, { id = \"s\", target = \"/b\" }]",
                "are the cache `s`",
            ),
        ] {
            let e = parse(&format!("{head}{body}\n")).unwrap_err();
            assert!(e.message().contains(want), "{body}: {}", e.message());
        }
        let e = parse("[image]\nname = \"x\"\n[[step]]\nwrite = \"/a\"\ncontent = \"\"\ncache = [{ target = \"/a\" }]\n").unwrap_err();
        assert!(e.message().contains("`cache` only applies to `run` steps"), "{}", e.message());
    }

    const ARGS_RECIPE: &str = r#"
[args]
VERSION = "1.0"
BASE = "stage:tools"
_empty = ""

[[stage]]
name = "tools"
[[stage.step]]
write = "/v"
content = "${VERSION}"

[image]
name = "app-${VERSION}"
base = "${BASE}"

[[step]]
run = ["/bin/sh", "-c", "echo ${VERSION} $HOME $$ $${HOME}"]
env = { V = "v${VERSION}${_empty}" }
workdir = "/opt/${VERSION}"

[[step]]
copy = "src-${VERSION}"
to = "/app/"

[config]
labels = { "org.opencontainers.image.version" = "${VERSION}" }
cmd = ["/app/run", "--version=${VERSION}"]
"#;

    fn val(name: &str, value: &str) -> ArgValue {
        ArgValue { name: name.into(), value: value.into(), origin: "--arg".into() }
    }

    #[test]
    fn args_are_substituted_where_documented() {
        let r = parse(ARGS_RECIPE).unwrap();
        assert_eq!(r.image.name, "app-1.0");
        assert_eq!(r.image.base, Base::Stage("tools".into()));
        let StepKind::Write(w) = &r.stages[0].steps[0].kind else { panic!() };
        assert_eq!(w.content, "1.0");
        let StepKind::Run(run) = &r.steps[0].kind else { panic!() };
        assert_eq!(
            run.command,
            Command::Exec(vec!["/bin/sh".into(), "-c".into(), "echo 1.0 $HOME $$ ${HOME}".into()])
        );
        assert_eq!(run.env["V"], "v1.0");
        assert_eq!(run.workdir.as_deref(), Some("/opt/1.0"));
        let StepKind::Copy(c) = &r.steps[1].kind else { panic!() };
        assert_eq!(c.src, "src-1.0");
        assert_eq!(r.config.labels["org.opencontainers.image.version"], "1.0");
        assert_eq!(r.config.cmd.as_ref().unwrap()[1], "--version=1.0");
        let shown: Vec<_> =
            r.args.iter().map(|a| (a.name.as_str(), a.value.as_str(), a.origin.as_str())).collect();
        assert_eq!(
            shown,
            [("BASE", "stage:tools", "default"), ("VERSION", "1.0", "default"), ("_empty", "", "default")]
        );

        // Command-line values win, the last one given first.
        let r = parse_str_with_args(
            "kiln.toml",
            ARGS_RECIPE.into(),
            Path::new("/ctx"),
            &[val("VERSION", "2"), val("VERSION", "3"), val("_empty", "-${X}")],
        )
        .unwrap();
        assert_eq!(r.image.name, "app-3");
        let StepKind::Run(run) = &r.steps[0].kind else { panic!() };
        assert_eq!(run.env["V"], "v3-${X}", "a value is not expanded again");
        assert_eq!(r.args[1].origin, "--arg");
    }

    #[test]
    fn bad_args_are_refused_at_their_place() {
        let at = |text: &str, values: &[ArgValue]| {
            parse_str_with_args("kiln.toml", text.to_string(), Path::new("/ctx"), values).unwrap_err()
        };
        // An undefined `${X}` points at the reference itself.
        let e = at("[image]\nname = \"x\"\n[[step]]\nrun = \"echo ${NOPE}\"\n", &[]);
        assert_eq!(e.location(), "kiln.toml:4:13");
        assert!(e.message().contains("`NOPE` is not declared in `[args]`"), "{}", e.message());
        assert!(e.hint().unwrap().contains("$${NOPE}"), "{:?}", e.hint());
        // In an array, in a label, in a step's env.
        for (text, place) in [
            ("[image]\nname = \"x\"\n[config]\ncmd = [\"a\", \"${NOPE}\"]\n", "kiln.toml:4:14"),
            ("[image]\nname = \"x\"\n[config]\nlabels = { a = \"${NOPE}\" }\n", "kiln.toml:4:17"),
            (
                "[image]\nname = \"x\"\n[[step]]\nrun = \"true\"\nenv = { A = \"${NOPE}\" }\n",
                "kiln.toml:5:14",
            ),
        ] {
            let e = at(text, &[]);
            assert_eq!(e.location(), place, "{text}");
            assert!(e.message().contains("`NOPE` is not declared"), "{text}: {}", e.message());
        }
        let e = at("[image]\nname = \"x-${A}\"\n", &[]);
        assert_eq!(e.location(), "kiln.toml:2:11");
        // The shell's own expansions are left alone.
        let r = parse("[image]\nname = \"x\"\n[[step]]\nrun = \"echo ${A:-x} ${#A} ${10}\"\n").unwrap();
        let StepKind::Run(run) = &r.steps[0].kind else { panic!() };
        assert_eq!(run.command, Command::Shell("echo ${A:-x} ${#A} ${10}".into()));
        // Bad names and defaults in `[args]`.
        let e = at("[args]\n\"A-B\" = \"1\"\n[image]\nname = \"x\"\n", &[]);
        assert_eq!(e.location(), "kiln.toml:2:1");
        assert!(e.message().contains("not an argument name"), "{}", e.message());
        let e = at("[args]\nV = 1.0\n[image]\nname = \"x\"\n", &[]);
        assert_eq!(e.location(), "kiln.toml:2:5");
        assert!(e.message().contains("default of `V` is not a string"), "{}", e.message());
        // A value for an argument the recipe does not declare: at `[args]`, or the file.
        let e = at("[args]\nA = \"1\"\n[image]\nname = \"x\"\n", &[val("B", "2")]);
        assert!(e.location().starts_with("kiln.toml:1:"), "{}", e.location());
        assert!(e.message().contains("`B` (--arg) is not declared"), "{}", e.message());
        let e = at("[image]\nname = \"x\"\n", &[val("B", "2")]);
        assert_eq!(e.location(), "kiln.toml");
        // `[packages]` and a step's `from` and `secrets` are not substituted.
        let e = at(
            "[args]\nP = \"ab\"\n[image]\nname = \"x\"\n[packages]\nsuite = \"s\"\ninclude = [\"${P}\"]\n",
            &[],
        );
        assert!(e.message().contains("not a Debian package name"), "{}", e.message());
        // A value is checked like the text it replaces.
        let e =
            at("[args]\nD = \"/x\"\n[image]\nname = \"x\"\n[[step]]\ncopy = \"..${D}\"\nto = \"/\"\n", &[]);
        assert!(e.message().contains("leaves the context"), "{}", e.message());
        let e = at(
            "[args]\nT = \"soon\"\n[image]\nname = \"x\"\n[[step]]\nrun = \"true\"\ntimeout = \"${T}\"\n",
            &[],
        );
        assert!(e.message().contains("`timeout` is not a duration"), "{}", e.message());
    }

    #[test]
    fn parses_run_steps_and_stages() {
        let r = parse(
            r#"
[[stage]]
name = "build"
base = "oci:base"
[[stage.step]]
run = "make"
env = { CC = "gcc" }
secrets = ["npmrc", { id = "key", uid = 1000, mode = "0440" }]

[[stage]]
name = "other"
base = "stage:build"

[image]
name = "app"
base = "stage:other"

[[step]]
copy = "/out/app/"
from = "build"
to = "/app"

[[step]]
run = ["/bin/true", "x"]
network = true
user = "0:0"
workdir = "/tmp/"
"#,
        )
        .unwrap();
        assert_eq!(r.stages.len(), 2);
        assert_eq!(r.stages[1].base, Base::Stage("build".into()));
        assert_eq!(r.image.base, Base::Stage("other".into()));
        let StepKind::Run(run) = &r.stages[0].steps[0].kind else { panic!() };
        assert_eq!(run.command, Command::Shell("make".into()));
        assert_eq!(
            run.secrets,
            vec![
                SecretUse { id: "npmrc".into(), uid: None, gid: None, mode: None },
                SecretUse { id: "key".into(), uid: Some(1000), gid: None, mode: Some(0o440) },
            ]
        );
        assert!(!run.network);
        let StepKind::Copy(c) = &r.steps[0].kind else { panic!() };
        assert_eq!((c.src.as_str(), c.from.as_deref()), ("/out/app", Some("build")));
        let StepKind::Run(run) = &r.steps[1].kind else { panic!() };
        assert_eq!(run.command.argv(), vec!["/bin/true", "x"]);
        assert_eq!((run.network, run.workdir.as_deref()), (true, Some("/tmp")));
    }

    #[test]
    fn packages_become_the_first_steps() {
        let r = parse(
            "[image]\nname = \"x\"\n[packages]\nsuite = \"bookworm\"\ninclude = [\"busybox-static\", \"python3-minimal=3.11.2-1+b1\"]\nkeyring = \"k.gpg\"\n[[step]]\nwrite = \"/a\"\ncontent = \"\"\n",
        )
        .unwrap();
        assert_eq!(r.steps.len(), 3);
        let StepKind::Packages(p) = &r.steps[0].kind else { panic!("packages first") };
        assert!(matches!(&r.steps[1].kind, StepKind::Configure(q) if q == p), "then their scripts");
        assert_eq!(p.components, ["main"]);
        assert_eq!(p.include[1], "python3-minimal=3.11.2-1+b1");
        assert_eq!(p.keyring.as_deref(), Some(Path::new("/ctx/k.gpg")));
        assert!(p.scripts && p.stage.is_none());
        // `suite` implies the -updates and -security suites, which may be missing.
        let names: Vec<(&str, bool)> = p.suites.iter().map(|s| (s.name.as_str(), s.optional)).collect();
        assert_eq!(names, [("bookworm", false), ("bookworm-updates", true), ("bookworm-security", true)]);
        assert_eq!((r.steps[0].index, r.steps[1].index, r.steps[2].index), (0, 1, 2));
    }

    #[test]
    fn suites_scripts_and_stage_packages() {
        let r = parse(
            "[[stage]]\nname = \"build\"\n[stage.packages]\nsuites = [\"bookworm\", { name = \"bookworm-security\", mirror = \"http://security.example/debian-security/\" }]\ninclude = [\"gcc\"]\n[[stage.step]]\nrun = \"true\"\n[image]\nname = \"x\"\n[packages]\nsuite = \"bookworm\"\ninclude = [\"libc6\"]\nscripts = false\n",
        )
        .unwrap();
        assert_eq!(r.steps.len(), 1, "no scripts step with scripts = false");
        let StepKind::Packages(p) = &r.steps[0].kind else { panic!() };
        assert!(!p.scripts);
        let st = &r.stages[0];
        assert_eq!(st.steps.len(), 3);
        let StepKind::Packages(sp) = &st.steps[0].kind else { panic!() };
        assert_eq!(sp.stage.as_deref(), Some("build"));
        assert_eq!(sp.suites[1].mirror.as_deref(), Some("http://security.example/debian-security"));
        assert!(!sp.suites[1].optional);
        assert!(matches!(st.steps[2].kind, StepKind::Run(_)));
        assert_eq!(st.steps[2].index, 2);
    }

    #[test]
    fn relative_bases_resolve_from_the_recipe_folder() {
        let r = parse("[image]\nname = \"x\"\nbase = \"oci:base:v2\"\n").unwrap();
        assert_eq!(r.image.base, Base::Oci { dir: "/ctx/base".into(), tag: Some("v2".into()) });
    }
}
