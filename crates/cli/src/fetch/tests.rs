use super::*;

fn fill(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for (i, f) in FILES.iter().enumerate() {
        let name = if i % 2 == 0 {
            format!("{f}.gz")
        } else {
            f.to_string()
        };
        std::fs::write(dir.join(name), b"x").unwrap();
    }
}

fn candidates(root: &Path) -> Candidates {
    Candidates {
        explicit: None,
        env: None,
        system: root.join("system"),
        cache: Some(root.join("cache")),
    }
}

#[test]
fn explicit_beats_env_beats_system_beats_cache() {
    let t = tempfile::tempdir().unwrap();
    let mut c = candidates(t.path());
    assert_eq!(c.locate().unwrap(), Located::Fetch(t.path().join("cache")));
    fill(&t.path().join("cache"));
    assert_eq!(c.locate().unwrap(), Located::Dir(t.path().join("cache")));
    fill(&t.path().join("system"));
    assert_eq!(c.locate().unwrap(), Located::Dir(t.path().join("system")));
    c.env = Some(t.path().to_path_buf());
    assert_eq!(c.locate().unwrap(), Located::Dir(t.path().to_path_buf()));
    c.explicit = Some(t.path().join("cache"));
    assert_eq!(c.locate().unwrap(), Located::Dir(t.path().join("cache")));
}

#[test]
fn missing_explicit_dir_is_an_error_not_a_fallback() {
    let t = tempfile::tempdir().unwrap();
    fill(&t.path().join("system"));
    let mut c = candidates(t.path());
    c.explicit = Some(t.path().join("nope"));
    let err = c.locate().unwrap_err().to_string();
    assert!(err.starts_with("--data "), "{err}");
    assert!(err.ends_with("nope: no such directory"), "{err}");
}

#[test]
fn partial_system_dir_is_skipped() {
    let t = tempfile::tempdir().unwrap();
    fill(&t.path().join("system"));
    std::fs::remove_file(t.path().join("system/t10k-labels-idx1-ubyte")).unwrap();
    let c = Candidates {
        cache: None,
        ..candidates(t.path())
    };
    assert_eq!(c.locate().unwrap(), Located::Nothing);
}

#[test]
fn print_uris_line_parses() {
    let line = "'http://deb.debian.org/debian/pool/main/d/dataset-fashion-mnist/\
                    dataset-fashion-mnist_0.0%7egit20200523.55506a9-1_all.deb' \
                    dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb 30900652 \
                    SHA256:39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0";
    let deb = DebFile::parse(line).unwrap();
    assert!(deb.url.starts_with("http://deb.debian.org/"), "{deb:?}");
    assert!(deb.url.ends_with("_all.deb"), "{deb:?}");
    assert_eq!(
        deb.file,
        "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb"
    );
    assert_eq!(deb.size, 30_900_652);
    for bad in [
        "",
        "Reading package lists...",
        "'http://x' f",
        "'http://x' f big",
    ] {
        assert_eq!(DebFile::parse(bad), None, "{bad:?}");
    }
}

#[test]
fn telling_line_prefers_apt_errors() {
    let stderr = b"W: Download is performed unsandboxed as root\n\
                       E: Unable to locate package  x\nN: see apt-get(8)\n\n";
    assert_eq!(telling_line(stderr), "E: Unable to locate package x");
    assert_eq!(telling_line(b"first\nlast\n\n"), "last");
    assert_eq!(telling_line(b""), "no message");
}

/// What `apt-config` makes of the private configuration: every path of
/// the apt state is inside it and the update hooks are gone.
#[test]
fn private_apt_state_points_inside_its_directory() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("apt");
    let private = PrivateApt::create(&dir).unwrap();
    let out = match Command::new("apt-config")
        .arg("-c")
        .arg(private.config())
        .arg("dump")
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            eprintln!("skipped: no apt-config ({e}): not a Debian machine");
            return;
        }
    };
    assert!(out.status.success());
    let dump = String::from_utf8(out.stdout).unwrap();
    // Keys are case-insensitive; the dump spells some in lower case.
    let value = |key: &str| {
        let prefix = format!("{} \"", key.to_ascii_lowercase());
        dump.lines()
            .find(|l| l.to_ascii_lowercase().starts_with(&prefix))
            .map(|l| &l[prefix.len()..])
            .and_then(|v| v.strip_suffix("\";"))
            .unwrap_or_else(|| panic!("no {key} in {dump}"))
            .to_string()
    };
    let d = dir.display().to_string();
    for key in [
        "Dir::State",
        "Dir::State::Lists",
        "Dir::State::status",
        "Dir::State::extended_states",
        "Dir::Cache",
        "Dir::Cache::archives",
        "Dir::Log",
    ] {
        assert!(value(key).starts_with(&d), "{key} = {}", value(key));
    }
    assert_eq!(value("Dir::Cache::pkgcache"), "");
    for hook in [
        "APT::Update::Post-Invoke-Success",
        "APT::Update::Post-Invoke",
        "DPkg::Post-Invoke",
    ] {
        assert!(
            !dump.lines().any(|l| l.starts_with(&format!("{hook}::"))),
            "{hook} survives: {dump}"
        );
    }
    assert!(dir.join("lists/partial").is_dir());
    assert_eq!(std::fs::read(dir.join("status")).unwrap(), b"");
}

#[test]
fn private_apt_state_refuses_paths_apt_cannot_quote() {
    let t = tempfile::tempdir().unwrap();
    let err = PrivateApt::create(&t.path().join("a\"b")).unwrap_err();
    assert!(
        err.to_string().starts_with("apt cannot be pointed at"),
        "{err}"
    );
}

#[test]
fn cache_dir_follows_xdg_then_home() {
    let d = |x: Option<&str>, h: Option<&str>| cache_dir(x.map(Into::into), h.map(Into::into));
    assert_eq!(
        d(Some("/x"), Some("/h")),
        Some(PathBuf::from("/x/mixnn/fashion-mnist"))
    );
    // A relative XDG_CACHE_HOME is invalid per the spec and ignored.
    assert_eq!(
        d(Some("rel"), Some("/h")),
        Some(PathBuf::from("/h/.cache/mixnn/fashion-mnist"))
    );
    assert_eq!(d(None, None), None);
}
