//! `--config FILE`: settings for `zonalfs mount` from a TOML file.
//!
//! Keys are the mount's long flag names (`file_mode` or `file-mode`), values
//! strings, integers or booleans. Precedence is flags > environment > file >
//! defaults: each key the file sets becomes the default of the flag's
//! `ZONALFS_*` environment variable unless that variable is already set, and
//! clap then lets a flag override it. Unknown keys are an error, as are keys
//! for flags that take no environment value.

use std::path::Path;

use clap::CommandFactory;

use crate::cli::Cli;

/// Finds `--config FILE` (or `--config=FILE`, or `$ZONALFS_CONFIG`) in the
/// arguments of a `mount` command.
pub fn config_path(args: &[String]) -> Option<String> {
    if args.get(1).map(String::as_str) != Some("mount") {
        return None;
    }
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--config" {
            return it.next().cloned();
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(p.to_string());
        }
    }
    std::env::var("ZONALFS_CONFIG").ok()
}

/// The (environment variable, value) pairs a config file sets, validated
/// against the mount command's flags.
pub fn read(path: &Path) -> Result<Vec<(String, String)>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("config file {}: {e}", path.display()))?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let line = e.span().map(|r| {
            text.as_bytes()[..r.start.min(text.len())]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1
        });
        match line {
            Some(l) => format!("config file {}: line {l}: {}", path.display(), e.message()),
            None => format!("config file {}: {}", path.display(), e.message()),
        }
    })?;
    let cmd = Cli::command();
    let mount = cmd
        .find_subcommand("mount")
        .ok_or("no mount command")?
        .clone();
    let mut out = Vec::new();
    for (key, value) in table {
        let flag = key.replace('_', "-");
        let arg = mount
            .get_arguments()
            .find(|a| a.get_long() == Some(flag.as_str()))
            .ok_or_else(|| format!("config file {}: unknown key '{key}'", path.display()))?;
        let env = arg
            .get_env()
            .and_then(|e| e.to_str())
            .filter(|_| flag != "config")
            .ok_or_else(|| {
                format!(
                    "config file {}: '{key}' cannot be set from a file",
                    path.display()
                )
            })?;
        let v = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => {
                return Err(format!(
                    "config file {}: '{key}' must be a string, number or boolean, not {}",
                    path.display(),
                    other.type_str()
                ))
            }
        };
        // Check the value now, so that a bad one is reported against the file
        // (clap would name only the flag and not say where the value came from).
        if arg.get_action().takes_values() {
            // The flag's parser alone (not the flag itself: its relations to
            // other flags, e.g. conflicts_with, name arguments not here).
            let one = clap::Command::new("zonalfs").no_binary_name(true).arg(
                clap::Arg::new("value")
                    .long("value")
                    .value_name("VALUE")
                    .action(clap::ArgAction::Set)
                    .value_parser(arg.get_value_parser().clone()),
            );
            if let Err(e) = one.try_get_matches_from([format!("--value={v}")]) {
                // clap's first paragraph (the message and, for a choice, the
                // possible values) on one line.
                let text = e.render().to_string();
                let why = text
                    .split("\n\n")
                    .next()
                    .unwrap_or_default()
                    .lines()
                    .map(str::trim)
                    .collect::<Vec<_>>()
                    .join(" ");
                let why = why.strip_prefix("error: ").unwrap_or(&why);
                let why = why.replace(" for '--value <VALUE>'", "");
                return Err(format!("config file {}: '{key}': {why}", path.display()));
            }
        } else if v != "true" && v != "false" {
            return Err(format!(
                "config file {}: '{key}' must be true or false, not '{v}'",
                path.display()
            ));
        }
        out.push((env.to_string(), v));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_environment_variables() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("z.toml");
        std::fs::write(
            &p,
            "file_mode = \"0440\"\nmetadata-ttl = \"30s\"\nallow_other = true\nuid = 1000\n",
        )
        .unwrap();
        let mut got = read(&p).unwrap();
        got.sort();
        assert_eq!(
            got,
            [
                ("ZONALFS_ALLOW_OTHER".to_string(), "true".to_string()),
                ("ZONALFS_FILE_MODE".into(), "0440".into()),
                ("ZONALFS_METADATA_TTL".into(), "30s".into()),
                ("ZONALFS_UID".into(), "1000".into()),
            ]
        );
        std::fs::write(&p, "bogus = 1\n").unwrap();
        assert!(read(&p).unwrap_err().contains("unknown key 'bogus'"));
        std::fs::write(&p, "uid = [1]\n").unwrap();
        assert!(read(&p).unwrap_err().contains("must be a string"));
        std::fs::write(&p, "file_mode = \"rw-r--r--\"\n").unwrap();
        let e = read(&p).unwrap_err();
        assert!(
            e.contains("'file_mode'") && e.contains("not an octal mode"),
            "{e}"
        );
        // Flags with relations to others (key_file conflicts with anonymous).
        std::fs::write(
            &p,
            "key_file = \"/k.json\"\nlog_format = \"json\"\npool_size = 3\n",
        )
        .unwrap();
        assert_eq!(read(&p).unwrap().len(), 3);
        std::fs::write(&p, "log_format = \"xml\"\n").unwrap();
        let e = read(&p).unwrap_err();
        assert!(
            e.contains("'log_format'") && e.contains("text, json") && !e.contains('\n'),
            "{e}"
        );
        std::fs::write(&p, "allow_other = \"maybe\"\n").unwrap();
        assert!(read(&p).unwrap_err().contains("'allow_other'"));
        std::fs::write(&p, "uid = \n").unwrap();
        assert!(read(&p).is_err());
        assert!(read(&dir.path().join("missing.toml")).is_err());
        let args: Vec<String> = ["zonalfs", "mount", "b", "/m", "--config", "/etc/z.toml"]
            .map(String::from)
            .to_vec();
        assert_eq!(config_path(&args).as_deref(), Some("/etc/z.toml"));
    }
}
