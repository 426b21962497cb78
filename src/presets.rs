//! Presets: named domain lists for common needs, shared with the NixOS module.
//!
//! The JSON files in `presets/` are the one source: the module reads them with
//! `builtins.fromJSON`, and this binary embeds them so `exec --preset` works on
//! any machine.

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    pub description: String,
    pub domains: Vec<String>,
}

macro_rules! embedded {
    ($($name:literal),* $(,)?) => {
        &[$(($name, include_str!(concat!("../presets/", $name, ".json")))),*]
    };
}

const EMBEDDED: &[(&str, &str)] = embedded![
    "anthropic",
    "codeberg",
    "crates",
    "debian",
    "docker",
    "gemini",
    "github",
    "gitlab",
    "go",
    "huggingface",
    "mistral",
    "nix",
    "npm",
    "openai",
    "openrouter",
    "pypi",
];

fn parse(name: &str, json: &str) -> Option<Preset> {
    match serde_json::from_str(json) {
        Ok(p) => Some(p),
        Err(e) => {
            // The unit tests parse every file, so this is never reached in a
            // released binary; if it were, the preset is refused, not guessed.
            log::error!("preset {name}: {e}");
            None
        }
    }
}

pub fn get(name: &str) -> Option<Preset> {
    EMBEDDED
        .iter()
        .find(|(n, _)| *n == name)
        .and_then(|(n, json)| parse(n, json))
}

pub fn all() -> Vec<(&'static str, Preset)> {
    EMBEDDED
        .iter()
        .filter_map(|(n, json)| parse(n, json).map(|p| (*n, p)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DomainPattern;

    #[test]
    fn every_file_is_embedded_and_valid() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("presets");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter_map(|f| f.strip_suffix(".json").map(str::to_string))
            .collect();
        files.sort();
        let mut embedded: Vec<String> = EMBEDDED.iter().map(|(n, _)| n.to_string()).collect();
        embedded.sort();
        assert_eq!(files, embedded, "presets/ and the embedded list differ");
        assert_eq!(all().len(), EMBEDDED.len());
        for (name, preset) in all() {
            assert!(!preset.domains.is_empty(), "{name} has no domains");
            for d in &preset.domains {
                DomainPattern::parse(d).unwrap_or_else(|e| panic!("preset {name}: {e}"));
            }
        }
    }

    #[test]
    fn unknown_preset_is_none() {
        assert!(get("no-such-preset").is_none());
        assert!(get("github").is_some());
    }
}
