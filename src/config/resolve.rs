//! Picking each setting's value by precedence (flags, environment, file, default) and checking it.

use super::*;

/// Picks each key's value by precedence and parses it, remembering what it showed.
pub(super) struct Resolver<'a> {
    pub(super) file: Option<&'a Path>,
    pub(super) file_values: BTreeMap<String, Raw>,
    pub(super) env: &'a Env,
    pub(super) flags: &'a FlagValues,
    pub(super) shown: Shown,
}

impl Resolver<'_> {
    /// The highest-precedence raw value of a key, if any was given.
    fn given(&self, setting: &'static Setting) -> Option<(Raw, Source)> {
        if let Some(raw) = self.flags.values.get(setting.key) {
            return Some((raw.clone(), Source::Flag(setting.flag.unwrap_or(setting.key))));
        }
        // RUST_LOG is the ecosystem's variable for log filters; honour it before our own.
        if setting.kind == Kind::LogLevel
            && let Some(value) = self.env.get("RUST_LOG")
        {
            return Some((Raw::Text(value.to_owned()), Source::Env("RUST_LOG".into())));
        }
        if let Some(value) = self.env.get(setting.env) {
            let raw = if setting.kind == Kind::HostPortList {
                Raw::List(value.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect())
            } else {
                Raw::Text(value.to_owned())
            };
            return Some((raw, Source::Env(setting.env.into())));
        }
        let path = self.file?;
        self.file_values.get(setting.key).map(|raw| (raw.clone(), Source::File(path.to_path_buf())))
    }

    /// Resolves a key with a parser and a default; records the shown value.
    /// Resolves a key with a parser, falling back to its declared default; records the shown value.
    fn value<T>(
        &mut self,
        key: &'static str,
        parse: impl Fn(&Raw) -> Result<T, String>,
        show: impl Fn(&T) -> String,
    ) -> Result<T, ConfigError> {
        self.value_and_source(key, parse, show).map(|(value, _)| value)
    }

    /// [`Self::value`], also returning where the value came from, for a setting whose behaviour depends on
    /// whether the operator chose it.
    fn value_and_source<T>(
        &mut self,
        key: &'static str,
        parse: impl Fn(&Raw) -> Result<T, String>,
        show: impl Fn(&T) -> String,
    ) -> Result<(T, Source), ConfigError> {
        let declared = |setting: &Setting| {
            let raw = match setting.default {
                DefaultValue::Text(text) => Raw::Text(text.to_owned()),
                DefaultValue::List(items) => Raw::List(items.iter().map(|item| (*item).to_owned()).collect()),
                DefaultValue::Computed => {
                    return Err(ConfigError::Invalid(format!("{key} has a computed default; resolve it so")));
                }
            };
            parse(&raw).map(|value| (value, Source::Default)).map_err(|e| {
                ConfigError::Invalid(format!("the built-in default of {key} does not read: {e}"))
            })
        };
        self.pick(key, &parse, declared, show)
    }

    /// Resolves a key whose default is computed (from the environment or other settings) by `default`.
    fn computed<T>(
        &mut self,
        key: &'static str,
        parse: impl Fn(&Raw) -> Result<T, String>,
        default: impl FnOnce() -> Result<(T, Source), ConfigError>,
        show: impl Fn(&T) -> String,
    ) -> Result<T, ConfigError> {
        self.pick(key, &parse, |_| default(), show).map(|(value, _)| value)
    }

    fn pick<T>(
        &mut self,
        key: &'static str,
        parse: &impl Fn(&Raw) -> Result<T, String>,
        default: impl FnOnce(&Setting) -> Result<(T, Source), ConfigError>,
        show: impl Fn(&T) -> String,
    ) -> Result<(T, Source), ConfigError> {
        let setting = setting(key).ok_or_else(|| ConfigError::Invalid(format!("no setting {key}")))?;
        let (value, source) = match self.given(setting) {
            Some((raw, source)) => match parse(&raw) {
                Ok(value) => (value, source),
                Err(problem) => {
                    return Err(ConfigError::BadValue {
                        key: setting.key,
                        origin: source,
                        problem,
                        accepted: setting.kind.accepted(),
                    });
                }
            },
            None => default(setting)?,
        };
        self.shown.push((key, show(&value), source.clone()));
        Ok((value, source))
    }

    pub(super) fn resolve(mut self) -> Result<(Config, Shown), ConfigError> {
        let env = self.env;
        let data_dir =
            self.computed("data_dir", parse_path, || default_data_dir(env), |p: &PathBuf| show_path(p))?;
        let log_level = self.value("log_level", parse_log_level, |v| quote(v))?;
        let log_format = self.value(
            "log_format",
            |raw| match text(raw)? {
                "text" => Ok(LogFormat::Text),
                "json" => Ok(LogFormat::Json),
                other => Err(format!("`{other}` is not a log format")),
            },
            |f| quote(if *f == LogFormat::Json { "json" } else { "text" }),
        )?;
        let shutdown_timeout = self.value("shutdown_timeout", parse_duration_raw, show_duration)?;
        let socket = self.computed(
            "control.socket",
            parse_path,
            || default_socket(env, &data_dir),
            |p: &PathBuf| show_path(p),
        )?;
        let tcp = self.value("control.tcp", parse_optional_addr, |v| {
            v.map(|a| quote(&a.to_string())).unwrap_or_else(|| "\"\"".into())
        })?;
        let inline_token = self.value("control.token", parse_secret, |v| {
            if v.is_some() { REDACTED.into() } else { "\"\"".into() }
        })?;
        let token_file = self.value("control.token_file", parse_optional_path, |v| {
            v.as_deref().map(show_path).unwrap_or_else(|| "\"\"".into())
        })?;
        let control_limits = self.server_limits([
            "control.max_connections",
            "control.handshake_timeout",
            "control.idle_timeout",
        ])?;
        let quic_listen = self.value("quic.listen", parse_addr, show_addr)?;
        let quic_limits = self.quic_limits()?;
        let dht = self.dht()?;
        let (monitoring_listen, monitoring_listen_source) =
            self.value_and_source("monitoring.listen", parse_addr, show_addr)?;
        let monitoring_limits = self.server_limits([
            "monitoring.max_connections",
            "monitoring.handshake_timeout",
            "monitoring.idle_timeout",
        ])?;
        let store = StoreConfig {
            retention: self.value("store.retention", parse_duration_raw, show_duration)?,
            max_peers: self.value("store.max_peers", parse_count, u64::to_string)?,
            max_joined_topics: self.value("store.max_joined_topics", parse_count, u64::to_string)?,
        };
        let relay = RelayConfig {
            enabled: self.value("relay.enabled", parse_bool, bool::to_string)?,
            max_reservations: self.value("relay.max_reservations", parse_count, u64::to_string)?,
            max_circuits: self.value("relay.max_circuits", parse_count, u64::to_string)?,
            max_bytes_per_second: self.value("relay.max_bytes_per_second", parse_bytes, show_bytes)?,
            max_bytes_per_circuit: self.value("relay.max_bytes_per_circuit", parse_bytes, show_bytes)?,
        };
        let token = token_source(inline_token, token_file)?;
        check_control(&socket, tcp, token.as_ref())?;
        let config = Config {
            data_dir,
            log_level,
            log_format,
            shutdown_timeout,
            control: ControlConfig { socket, tcp, token, limits: control_limits },
            quic_listen,
            quic_limits,
            dht,
            monitoring_listen,
            monitoring_listen_source,
            monitoring_limits,
            store,
            relay,
        };
        Ok((config, self.shown))
    }

    fn dht(&mut self) -> Result<DhtConfig, ConfigError> {
        Ok(DhtConfig {
            listen: self.value("dht.listen", parse_addr, show_addr)?,
            bootstrap: self.value("dht.bootstrap", parse_host_ports, |v| {
                format!("[{}]", v.iter().map(|s| quote(s)).collect::<Vec<_>>().join(", "))
            })?,
            mode: self.value("dht.mode", parse_dht_mode, |m| quote(m.as_str()))?,
            announce_interval: self.value("dht.announce_interval", parse_interval, show_duration)?,
            lookup_interval: self.value("dht.lookup_interval", parse_interval, show_duration)?,
        })
    }

    /// A local server's connection cap, handshake and idle timeouts, under `keys` in that order.
    fn server_limits(&mut self, keys: [&'static str; 3]) -> Result<ServerLimitSettings, ConfigError> {
        let [max_connections, handshake_timeout, idle_timeout] = keys;
        Ok(ServerLimitSettings {
            max_connections: as_usize(self.value(max_connections, parse_count, u64::to_string)?),
            handshake_timeout: self.value(handshake_timeout, parse_interval, show_duration)?,
            idle_timeout: self.value(idle_timeout, parse_interval, show_duration)?,
        })
    }

    /// The `quic.*` limits; what no setting covers keeps the transport's own value.
    fn quic_limits(&mut self) -> Result<crate::quic::QuicLimits, ConfigError> {
        let count = |this: &mut Self, key| this.value(key, parse_count, u64::to_string).map(as_usize);
        let interval = |this: &mut Self, key| this.value(key, parse_interval, show_duration);
        Ok(crate::quic::QuicLimits {
            max_connections: count(self, "quic.max_connections")?,
            handshake_timeout: interval(self, "quic.handshake_timeout")?,
            inbound_handshake_timeout: interval(self, "quic.inbound_handshake_timeout")?,
            max_pending_handshakes: count(self, "quic.max_pending_handshakes")?,
            retry_threshold: count(self, "quic.retry_threshold")?,
            max_unvalidated_per_ip: count(self, "quic.max_unvalidated_per_ip")?,
            reflections_per_ip: count(self, "quic.reflections_per_ip")?,
            reflection_burst: count(self, "quic.reflection_burst")?,
            reflections_per_second: count(self, "quic.reflections_per_second")?,
            ..crate::quic::QuicLimits::default()
        })
    }
}

fn as_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// Where the control token comes from: at most one of the two settings.
fn token_source(inline: Option<String>, file: Option<PathBuf>) -> Result<Option<TokenSource>, ConfigError> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(ConfigError::Invalid(
            "both control.token and control.token_file are set; keep only one".into(),
        )),
        (Some(token), None) => Ok(Some(TokenSource::Inline(token))),
        (None, Some(path)) => Ok(Some(TokenSource::File(path))),
        (None, None) => Ok(None),
    }
}

/// Refuses a control API open to the network without a token, and a socket path too long for a Unix socket.
fn check_control(
    socket: &Path,
    tcp: Option<SocketAddr>,
    token: Option<&TokenSource>,
) -> Result<(), ConfigError> {
    if let Some(tcp) = tcp
        && !tcp.ip().is_loopback()
        && token.is_none()
    {
        return Err(ConfigError::Invalid(format!(
            "control.tcp = {tcp} is not a loopback address, so the control API would be open to the \
             network: set control.token_file (or control.token / RN_CONTROL_TOKEN) to require a bearer \
             token, or listen on 127.0.0.1"
        )));
    }
    if socket.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(ConfigError::Invalid(format!(
            "control.socket path {} is {} bytes, longer than the {MAX_SOCKET_PATH} a Unix socket path \
             allows; choose a shorter path",
            socket.display(),
            socket.as_os_str().len()
        )));
    }
    Ok(())
}

pub(super) fn default_data_dir(env: &Env) -> Result<(PathBuf, Source), ConfigError> {
    // systemd may pass several directories separated by colons; ours is the first.
    if let Some(dirs) = env.get("STATE_DIRECTORY")
        && let Some(first) = dirs.split(':').next()
    {
        return Ok((PathBuf::from(first), Source::DefaultFrom("STATE_DIRECTORY")));
    }
    if let Some(data_home) = env.get("XDG_DATA_HOME") {
        return Ok((Path::new(data_home).join(APP_DIR), Source::DefaultFrom("XDG_DATA_HOME")));
    }
    if let Some(home) = env.get("HOME") {
        return Ok((Path::new(home).join(".local/share").join(APP_DIR), Source::DefaultFrom("HOME")));
    }
    Err(ConfigError::Invalid(
        "cannot choose a data directory: none of STATE_DIRECTORY, XDG_DATA_HOME or HOME is set; pass \
         --data-dir"
            .into(),
    ))
}

pub(super) fn default_socket(env: &Env, data_dir: &Path) -> Result<(PathBuf, Source), ConfigError> {
    if let Some(dirs) = env.get("RUNTIME_DIRECTORY")
        && let Some(first) = dirs.split(':').next()
    {
        return Ok((Path::new(first).join(SOCKET_FILE), Source::DefaultFrom("RUNTIME_DIRECTORY")));
    }
    if let Some(runtime) = env.get("XDG_RUNTIME_DIR") {
        return Ok((
            Path::new(runtime).join(APP_DIR).join(SOCKET_FILE),
            Source::DefaultFrom("XDG_RUNTIME_DIR"),
        ));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return Ok((Path::new("/run").join(APP_DIR).join(SOCKET_FILE), Source::Default));
    }
    Ok((data_dir.join(SOCKET_FILE), Source::Default))
}
