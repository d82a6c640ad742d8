//! Running a recipe's provisioners and tests on a builder over SSH: the same definitions,
//! hardening profiles and `tests` the snapshot strategy runs in a chroot, with the same
//! templating and the same redaction of sensitive values in everything shown.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use russh::keys::PrivateKey;

use super::InstanceError;
use crate::build::pipeline::BuildReporter;
use crate::build::runner::{OutputLine, StepOutput, Stream};
use crate::recipe::template::{Context, Renderer};
use crate::recipe::{FileStep, Provisioner, Recipe, Script, Step, Test};
use crate::ssh::{HostKeyPolicy, RemoteScript, RunAs, Session, SshError, SshTarget};
use crate::store::Store;

/// How long a hardening profile may run (the snapshot strategy allows the same).
const HARDENING_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// How many of a failing step's last output lines the error shows.
const LAST_LINES: usize = 20;

/// How long bake waits for a builder to come back after a reboot step.
const REBOOT_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// Everything provisioning needs besides the recipe.
pub struct Provisioning<'a> {
    pub store: &'a Store,
    pub target: SshTarget,
    pub key: Arc<PrivateKey>,
    pub host_key: russh::keys::PublicKey,
    pub renderer: &'a Renderer,
    /// Scripts and their environment see secrets.
    pub secret: &'a Context,
    /// Destinations and anything shown use the redacted context.
    pub public: &'a Context,
    pub secrets: Vec<String>,
    pub cancel: &'a (dyn Fn() -> bool + Sync),
}

impl Provisioning<'_> {
    fn redact(&self, text: &str) -> String {
        crate::recipe::redact(text, &self.secrets)
    }

    /// Runs every provisioner in order, reconnecting after reboot steps.
    pub async fn provision(
        &self,
        session: &mut Session,
        recipe: &Recipe,
        reporter: &mut dyn BuildReporter,
    ) -> Result<(), InstanceError> {
        for provisioner in &recipe.provisioners {
            if (self.cancel)() {
                return Err(InstanceError::Interrupted);
            }
            reporter.step_started(&provisioner.name, false);
            let clock = Instant::now();
            let _progress = crate::progress::Task::new(
                format!("step {} over SSH", provisioner.name),
                None,
                crate::progress::Unit::Count("lines"),
            );
            self.step(session, recipe, provisioner, reporter).await?;
            reporter.step_finished(&provisioner.name, clock.elapsed());
        }
        Ok(())
    }

    async fn step(
        &self,
        session: &mut Session,
        recipe: &Recipe,
        provisioner: &Provisioner,
        reporter: &mut dyn BuildReporter,
    ) -> Result<(), InstanceError> {
        let name = &provisioner.name;
        match &provisioner.step {
            Step::File(file) => self.file(session, name, file, reporter).await,
            Step::Shell(shell) => {
                let script = match &shell.script {
                    Script::Inline(template) => self.renderer.render(template, self.secret)?,
                    Script::File {
                        template: Some(template),
                        ..
                    } => self.renderer.render(template, self.secret)?,
                    Script::File {
                        path,
                        template: None,
                        ..
                    } => fs_err::read_to_string(path).map_err(|source| InstanceError::Io {
                        path: path.clone(),
                        source,
                    })?,
                };
                let env = shell
                    .env
                    .iter()
                    .map(|(k, t)| Ok((k.clone(), self.renderer.render(t, self.secret)?)))
                    .collect::<Result<Vec<_>, crate::recipe::RecipeError>>()?;
                let remote = RemoteScript {
                    name: name.clone(),
                    script,
                    env,
                    run_as: shell
                        .user
                        .as_ref()
                        .map_or(RunAs::Root, |u| RunAs::User(u.clone())),
                    workdir: shell.workdir.clone(),
                    timeout: shell.timeout,
                };
                if shell.expect_reboot {
                    self.reboot_step(session, &remote, reporter).await
                } else {
                    self.script(session, &remote, 0, reporter).await.map(|_| ())
                }
            }
            Step::Hardening(hardening) => {
                let flavour = crate::plan::hardening_flavour(recipe, hardening);
                let script = crate::build::hardening::script(
                    &hardening.profile,
                    flavour,
                    &hardening.exclude,
                )
                .ok_or_else(|| InstanceError::UnknownProfile(hardening.profile.clone()))?;
                let remote = RemoteScript {
                    name: name.clone(),
                    script,
                    env: Vec::new(),
                    run_as: RunAs::Root,
                    workdir: None,
                    timeout: HARDENING_TIMEOUT,
                };
                self.script(session, &remote, 0, reporter).await.map(|_| ())
            }
        }
    }

    /// Runs a script, streaming (redacted) output, and checks its exit code.
    async fn script(
        &self,
        session: &Session,
        remote: &RemoteScript,
        expected: i32,
        reporter: &mut dyn BuildReporter,
    ) -> Result<Vec<OutputLine>, InstanceError> {
        let mut tee = Tee {
            lines: Vec::new(),
            reporter,
            secrets: &self.secrets,
        };
        let code = session
            .run(remote, &mut tee, self.cancel)
            .await
            .map_err(|e| self.ssh_error(e))?;
        let lines = tee.lines;
        if i64::from(code) != i64::from(expected) {
            let start = lines.len().saturating_sub(LAST_LINES);
            return Err(InstanceError::StepFailed {
                step: remote.name.clone(),
                code,
                expected,
                last_lines: lines[start..].iter().map(|l| l.text.clone()).collect(),
            });
        }
        Ok(lines)
    }

    fn ssh_error(&self, e: SshError) -> InstanceError {
        match e {
            SshError::Interrupted { .. } => InstanceError::Interrupted,
            other => InstanceError::Ssh(other),
        }
    }

    /// A step that reboots the machine: note the boot id, run it (a dropped connection is
    /// expected), then reconnect until a different boot id answers.
    async fn reboot_step(
        &self,
        session: &mut Session,
        remote: &RemoteScript,
        reporter: &mut dyn BuildReporter,
    ) -> Result<(), InstanceError> {
        let before = self.boot_id(session).await?;
        match self.script(session, remote, 0, reporter).await {
            Ok(_) => {}
            Err(InstanceError::Ssh(SshError::Disconnected { .. } | SshError::Signal { .. })) => {}
            Err(e) => return Err(e),
        }
        reporter.message(&format!(
            "{}: waiting for the builder to come back",
            remote.name
        ));
        let deadline = Instant::now() + REBOOT_TIMEOUT;
        let mut last = String::from("no attempt yet");
        while Instant::now() < deadline {
            if (self.cancel)() {
                return Err(InstanceError::Interrupted);
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
            match Session::connect(
                &self.target,
                Arc::clone(&self.key),
                HostKeyPolicy::Pinned(vec![self.host_key.clone()]),
            )
            .await
            {
                Ok(new) => match self.boot_id(&new).await {
                    Ok(id) if id != before => {
                        *session = new;
                        return Ok(());
                    }
                    Ok(_) => last = "the host has not rebooted yet".into(),
                    Err(e) => last = e.to_string(),
                },
                Err(e @ SshError::HostKeyMismatch { .. }) => return Err(InstanceError::Ssh(e)),
                Err(e) => last = e.to_string(),
            }
        }
        Err(InstanceError::RebootTimeout {
            step: remote.name.clone(),
            last_error: last,
        })
    }

    async fn boot_id(&self, session: &Session) -> Result<String, InstanceError> {
        let mut lines: Vec<OutputLine> = Vec::new();
        let code = session
            .exec(
                "boot-id",
                "cat /proc/sys/kernel/random/boot_id",
                Duration::from_secs(30),
                &mut lines,
                self.cancel,
            )
            .await
            .map_err(|e| self.ssh_error(e))?;
        match (code, lines.first()) {
            (0, Some(line)) => Ok(line.text.trim().to_owned()),
            _ => Err(InstanceError::StepFailed {
                step: "boot-id".into(),
                code,
                expected: 0,
                last_lines: lines.into_iter().map(|l| l.text).collect(),
            }),
        }
    }

    /// Uploads a file step's source over SFTP into a staging directory, then moves it into
    /// place as root with the step's mode and owner.
    async fn file(
        &self,
        session: &Session,
        name: &str,
        file: &FileStep,
        reporter: &mut dyn BuildReporter,
    ) -> Result<(), InstanceError> {
        let destination = self.renderer.render(&file.destination, self.public)?;
        let staging = if file.template {
            Some(self.render_sources(file)?)
        } else {
            None
        };
        let source = match &staging {
            Some((_, path)) => path.clone(),
            None => file.source.clone(),
        };
        let staged = session
            .upload_staged(&source)
            .await
            .map_err(|e| self.ssh_error(e))?;
        let command = crate::ssh::install_command(
            &staged,
            &destination,
            file.mode,
            file.owner.unwrap_or((0, 0)),
        );
        let remote = RemoteScript {
            name: name.to_owned(),
            script: command,
            env: Vec::new(),
            run_as: RunAs::Root,
            workdir: None,
            timeout: Duration::from_secs(10 * 60),
        };
        self.script(session, &remote, 0, reporter).await.map(|_| ())
    }

    /// Renders a templated file source into a local staging copy with the same layout.
    fn render_sources(
        &self,
        file: &FileStep,
    ) -> Result<(tempfile::TempDir, PathBuf), InstanceError> {
        let staging = self.store.work_dir("render")?;
        let name = file
            .source
            .file_name()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("source"));
        let top = staging.path().join(name);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| InstanceError::Io { path, source }
        };
        for (relative, template) in &file.templates {
            let out = if relative.as_os_str().is_empty() {
                top.clone()
            } else {
                top.join(relative)
            };
            if let Some(parent) = out.parent() {
                fs_err::create_dir_all(parent).map_err(io(parent))?;
            }
            let text = self.renderer.render(template, self.public)?;
            fs_err::write(&out, text).map_err(io(&out))?;
            let mode = fs_err::metadata(file.source.join(relative))
                .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()))
                .unwrap_or(0o644);
            fs_err::set_permissions(&out, std::os::unix::fs::PermissionsExt::from_mode(mode))
                .map_err(io(&out))?;
        }
        Ok((staging, top))
    }

    /// Runs the recipe's command tests on the builder.
    pub async fn tests(
        &self,
        session: &Session,
        recipe: &Recipe,
        reporter: &mut dyn BuildReporter,
    ) -> Result<(), InstanceError> {
        for test in &recipe.tests {
            if (self.cancel)() {
                return Err(InstanceError::Interrupted);
            }
            let Test::Command {
                name,
                run,
                exit_code,
                stdout_contains,
                user,
                timeout,
                ..
            } = test
            else {
                reporter.message("boot tests run on disk images (snapshot strategy); skipped on a builder instance");
                continue;
            };
            reporter.step_started(name, false);
            let clock = Instant::now();
            let remote = RemoteScript {
                name: name.clone(),
                script: self.renderer.render(run, self.secret)?,
                env: Vec::new(),
                run_as: user
                    .as_ref()
                    .map_or(RunAs::Root, |u| RunAs::User(u.clone())),
                workdir: None,
                timeout: *timeout,
            };
            let lines = self
                .script(session, &remote, *exit_code, reporter)
                .await
                .map_err(|e| match e {
                    InstanceError::StepFailed { code, .. } => InstanceError::Test {
                        name: name.clone(),
                        reason: format!("it exited with {code}, expected {exit_code}"),
                    },
                    other => other,
                })?;
            if let Some(expected) = stdout_contains {
                let expected = self.renderer.render(expected, self.secret)?;
                let stdout: String = lines
                    .iter()
                    .filter(|l| l.stream == Stream::Stdout)
                    .map(|l| format!("{}\n", l.text))
                    .collect();
                if !stdout.contains(&expected) {
                    return Err(InstanceError::Test {
                        name: name.clone(),
                        reason: format!("its output does not contain `{}`", self.redact(&expected)),
                    });
                }
            }
            reporter.step_finished(name, clock.elapsed());
        }
        Ok(())
    }
}

/// Keeps the (redacted) lines of a step and passes them on.
struct Tee<'a> {
    lines: Vec<OutputLine>,
    reporter: &'a mut dyn BuildReporter,
    secrets: &'a [String],
}

impl StepOutput for Tee<'_> {
    fn line(&mut self, step: &str, stream: Stream, line: &str) {
        let line = crate::recipe::redact(line, self.secrets);
        self.reporter.line(step, stream, &line);
        self.lines.push(OutputLine { stream, text: line });
    }
}
