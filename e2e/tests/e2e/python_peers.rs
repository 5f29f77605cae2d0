//! The third-party peers the suite runs are exactly the ones pinned: a venv left over from
//! other pins (or a package missing from it) fails here, by name, rather than making another
//! test prove something about a version no one chose. `bash hack/python-peers.sh` fixes it.

use std::collections::BTreeMap;

use ringfence_e2e::peers;

/// `name==version` lines of e2e/python/requirements.txt, extras dropped.
fn pinned() -> BTreeMap<String, String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/requirements.txt");
    let text = std::fs::read_to_string(&path).unwrap();
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (name, version) = l
                .split_once("==")
                .unwrap_or_else(|| panic!("{}: {l:?} is not pinned with ==", path.display()));
            let name = name.split('[').next().unwrap_or(name).trim();
            (name.to_owned(), version.trim().to_owned())
        })
        .collect()
}

#[test]
fn the_python_peers_are_installed_at_the_pinned_versions() {
    let pins = pinned();
    for sdk in ["a2a-sdk", "mcp", "openai"] {
        assert!(pins.contains_key(sdk), "{sdk} is not pinned: {pins:?}");
    }
    let names: Vec<&str> = pins.keys().map(String::as_str).collect();
    let out = std::process::Command::new(peers::python())
        .args([
            "-c",
            "import json, sys\nfrom importlib.metadata import version, PackageNotFoundError\n\
             def v(n):\n    try:\n        return version(n)\n    except PackageNotFoundError:\n        return None\n\
             print(json.dumps({n: v(n) for n in sys.argv[1:]}))",
        ])
        .args(&names)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let installed: BTreeMap<String, Option<String>> = serde_json::from_slice(&out.stdout).unwrap();
    for (name, want) in &pins {
        assert_eq!(
            installed[name].as_deref(),
            Some(want.as_str()),
            "e2e/.venv has {name} {:?}, the suite pins {want}: run `bash hack/python-peers.sh`",
            installed[name]
        );
    }
}
