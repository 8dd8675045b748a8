//! `taper::hub` against a fake Hub on a loopback port (`common::hub_server`):
//! downloads into the Hub cache layout, revisions, gated and missing repos,
//! the cache and offline mode, and local folders. Each test has its own server
//! and cache folder, and builds `HubOptions` by hand: the environment is shared
//! by tests running in parallel.

use std::path::{Path, PathBuf};

use taper::hub::{resolve, HubOptions, ModelFiles, ModelSource};
use taper::Error;

use crate::common::fixture;
use crate::common::hub_server::HubServer;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const COMMIT_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa1";
const COMMIT_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb2";
const COMMIT_PR: &str = "ccccccccccccccccccccccccccccccccccccccc3";

fn options(server: &HubServer, cache: &Path) -> HubOptions {
    HubOptions {
        endpoint: server.endpoint(),
        token: None,
        cache_dir: cache.to_path_buf(),
        offline: false,
        progress: false,
    }
}

fn hub(repo: &str, revision: &str) -> ModelSource {
    ModelSource::Hub {
        repo: repo.to_string(),
        revision: revision.to_string(),
    }
}

/// A throwaway repo folder holding `files`.
fn repo_dir(files: &[(&str, &str)]) -> Result<tempfile::TempDir, std::io::Error> {
    let dir = tempfile::tempdir()?;
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text)?;
    }
    Ok(dir)
}

/// Requests on the Hub's routes, leaving out the CDN they redirect to.
fn hub_requests(server: &HubServer) -> Vec<String> {
    server
        .requests()
        .into_iter()
        .map(|r| r.path)
        .filter(|path| path.contains("/resolve/"))
        .collect()
}

fn snapshot(cache: &Path, folder: &str, commit: &str) -> PathBuf {
    cache.join(folder).join("snapshots").join(commit)
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Every file `resolve` found, with its name.
fn named(files: &ModelFiles) -> Vec<(String, PathBuf)> {
    let mut all = vec![&files.config];
    all.extend(files.generation_config.iter());
    all.extend(files.tokenizer.iter());
    all.extend(files.tokenizer_config.iter());
    all.extend(files.weights.iter());
    all.into_iter()
        .map(|path| {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            (name.unwrap_or_default(), path.clone())
        })
        .collect()
}

#[test]
fn single_file_repo_lands_in_the_hub_cache_layout() -> TestResult {
    let model = fixture("qwen2");
    let server = HubServer::builder()
        .repo("org/qwen2", "main", COMMIT_A, &model)
        .start();
    let cache = tempfile::tempdir()?;

    let files = resolve(&hub("org/qwen2", "main"), &options(&server, cache.path()))?;

    let snap = snapshot(cache.path(), "models--org--qwen2", COMMIT_A);
    assert_eq!(files.config, snap.join("config.json"));
    assert_eq!(
        files.generation_config,
        Some(snap.join("generation_config.json"))
    );
    assert_eq!(files.tokenizer, Some(snap.join("tokenizer.json")));
    assert_eq!(
        files.tokenizer_config,
        Some(snap.join("tokenizer_config.json"))
    );
    assert_eq!(files.weights, [snap.join("model.safetensors")]);
    for (name, path) in named(&files) {
        assert_eq!(read(&path), read(&model.join(&name)), "{name}");
        // Snapshots link into content-addressed blobs, as huggingface_hub lays them out.
        assert!(
            std::fs::symlink_metadata(&path)?.file_type().is_symlink(),
            "{name}"
        );
        let blob = std::fs::canonicalize(&path)?;
        assert_eq!(
            blob.parent(),
            Some(std::fs::canonicalize(cache.path().join("models--org--qwen2/blobs"))?.as_path())
        );
    }
    let main = std::fs::read_to_string(cache.path().join("models--org--qwen2/refs/main"))?;
    assert_eq!(main, COMMIT_A);
    // The weights came through the Hub's redirect to its CDN.
    assert!(server
        .requests()
        .iter()
        .any(|r| r.path.starts_with("/__cdn/")));
    Ok(())
}

#[test]
fn sharded_repo_gives_its_shards_in_sorted_order() -> TestResult {
    let model = fixture("llama");
    let server = HubServer::builder()
        .repo("org/llama", "main", COMMIT_A, &model)
        .start();
    let cache = tempfile::tempdir()?;

    let files = resolve(&hub("org/llama", "main"), &options(&server, cache.path()))?;

    let snap = snapshot(cache.path(), "models--org--llama", COMMIT_A);
    let shards = [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ];
    assert_eq!(files.weights, shards.map(|s| snap.join(s)));
    for shard in shards {
        assert_eq!(read(&snap.join(shard)), read(&model.join(shard)), "{shard}");
    }
    // The index was read, and the single-file name never asked for.
    let asked = hub_requests(&server);
    assert!(asked
        .iter()
        .any(|p| p.ends_with("/model.safetensors.index.json")));
    assert!(
        !asked.iter().any(|p| p.ends_with("/model.safetensors")),
        "{asked:?}"
    );
    Ok(())
}

#[test]
fn every_fixture_resolves_from_the_hub_as_from_its_folder() -> TestResult {
    for name in crate::common::MODELS {
        let model = fixture(name);
        let repo = format!("fixtures/{name}");
        let server = HubServer::builder()
            .repo(&repo, "main", COMMIT_A, &model)
            .start();
        let cache = tempfile::tempdir()?;

        let local = resolve(
            &ModelSource::parse(&model.to_string_lossy(), None)?,
            &options(&server, cache.path()),
        )?;
        let remote = resolve(&hub(&repo, "main"), &options(&server, cache.path()))?;

        let (local, remote) = (named(&local), named(&remote));
        let names =
            |files: &[(String, PathBuf)]| files.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        assert_eq!(names(&local), names(&remote), "{name}");
        for ((file, local), (_, remote)) in local.iter().zip(&remote) {
            assert_eq!(read(local), read(remote), "{name}/{file}");
        }
    }
    Ok(())
}

#[test]
fn missing_optional_files_are_none_and_not_asked_for_again() -> TestResult {
    let repo = repo_dir(&[("config.json", "{}"), ("model.safetensors", "weights")])?;
    let server = HubServer::builder()
        .repo("org/bare", "main", COMMIT_A, repo.path())
        .start();
    let cache = tempfile::tempdir()?;
    let opts = options(&server, cache.path());

    let files = resolve(&hub("org/bare", "main"), &opts)?;
    assert_eq!(files.generation_config, None);
    assert_eq!(files.tokenizer, None);
    assert_eq!(files.tokenizer_config, None);
    assert_eq!(
        files.weights,
        [snapshot(cache.path(), "models--org--bare", COMMIT_A).join("model.safetensors")]
    );

    // The Hub's 404s name the commit, so their absence is recorded where
    // huggingface_hub records it, and a second run asks nothing.
    let marker = cache
        .path()
        .join("models--org--bare/.no_exist")
        .join(COMMIT_A)
        .join("tokenizer.json");
    assert!(marker.exists(), "{}", marker.display());
    server.clear_requests();
    assert_eq!(resolve(&hub("org/bare", "main"), &opts)?, files);
    assert_eq!(server.requests().len(), 0);
    Ok(())
}

#[test]
fn cached_files_are_not_fetched_again() -> TestResult {
    let server = HubServer::builder()
        .repo("org/llama", "main", COMMIT_A, &fixture("llama"))
        .start();
    let cache = tempfile::tempdir()?;
    let opts = options(&server, cache.path());

    let first = resolve(&hub("org/llama", "main"), &opts)?;
    // config, generation config, tokenizer, tokenizer config, index, 3 shards:
    // each one metadata request and one download; plus one 404 for the
    // chat_template.jinja the fixture does not have.
    assert_eq!(hub_requests(&server).len(), 2 * 8 + 1);

    server.clear_requests();
    let second = resolve(&hub("org/llama", "main"), &opts)?;
    assert_eq!(second, first);
    assert_eq!(server.requests().len(), 0, "{:?}", server.requests());
    Ok(())
}

#[test]
fn a_revision_gets_its_own_bytes_and_ref() -> TestResult {
    let v1 = repo_dir(&[
        ("config.json", r#"{"v": 1}"#),
        ("model.safetensors", "weights v1"),
    ])?;
    let v2 = repo_dir(&[
        ("config.json", r#"{"v": 2}"#),
        ("model.safetensors", "weights v2"),
    ])?;
    let server = HubServer::builder()
        .repo("org/m", "main", COMMIT_A, v1.path())
        .repo("org/m", "v2", COMMIT_B, v2.path())
        .start();
    let cache = tempfile::tempdir()?;
    let opts = options(&server, cache.path());
    let repo_cache = cache.path().join("models--org--m");

    let files = resolve(&hub("org/m", "v2"), &opts)?;
    assert_eq!(read(&files.config), br#"{"v": 2}"#);
    assert_eq!(read(&files.weights[0]), b"weights v2");
    assert_eq!(
        files.config,
        snapshot(cache.path(), "models--org--m", COMMIT_B).join("config.json")
    );
    assert_eq!(
        std::fs::read_to_string(repo_cache.join("refs/v2"))?,
        COMMIT_B
    );
    assert!(!repo_cache.join("refs/main").exists());
    assert!(hub_requests(&server)
        .iter()
        .all(|p| p.starts_with("/org/m/resolve/v2/")));

    // main keeps its own snapshot next to v2's.
    let files = resolve(&hub("org/m", "main"), &opts)?;
    assert_eq!(read(&files.config), br#"{"v": 1}"#);
    assert_eq!(read(&files.weights[0]), b"weights v1");
    assert_eq!(
        std::fs::read_to_string(repo_cache.join("refs/main"))?,
        COMMIT_A
    );

    // A commit hash finds the snapshot downloaded through its branch, offline.
    let offline = HubOptions {
        offline: true,
        ..opts.clone()
    };
    server.clear_requests();
    let files = resolve(&hub("org/m", COMMIT_B), &offline)?;
    assert_eq!(read(&files.config), br#"{"v": 2}"#);
    assert_eq!(server.requests().len(), 0);

    // Online, a commit hash is asked for by hash.
    let files = resolve(&hub("org/m", COMMIT_A), &opts)?;
    assert_eq!(read(&files.config), br#"{"v": 1}"#);
    Ok(())
}

#[test]
fn a_pull_request_revision_is_escaped_and_nested_under_refs() -> TestResult {
    let pr = repo_dir(&[
        ("config.json", r#"{"pr": 1}"#),
        ("model.safetensors", "pr weights"),
    ])?;
    let server = HubServer::builder()
        .repo("org/m", "refs/pr/1", COMMIT_PR, pr.path())
        .start();
    let cache = tempfile::tempdir()?;

    let files = resolve(&hub("org/m", "refs/pr/1"), &options(&server, cache.path()))?;

    assert_eq!(read(&files.config), br#"{"pr": 1}"#);
    assert!(hub_requests(&server)
        .iter()
        .all(|p| p.starts_with("/org/m/resolve/refs%2Fpr%2F1/")));
    let pr_ref = cache.path().join("models--org--m/refs/refs/pr/1");
    assert_eq!(std::fs::read_to_string(pr_ref)?, COMMIT_PR);
    Ok(())
}

#[test]
fn gated_repo_needs_the_right_token() -> TestResult {
    let server = HubServer::builder()
        .repo("org/gated", "main", COMMIT_A, &fixture("qwen2"))
        .gated("org/gated", "hf_good")
        .start();
    let cache = tempfile::tempdir()?;
    let anonymous = options(&server, cache.path());

    let err = resolve(&hub("org/gated", "main"), &anonymous).err();
    assert!(
        matches!(&err, Some(Error::HubUnauthorized { repo, status: 401 }) if repo == "org/gated"),
        "{err:?}"
    );
    let message = err.map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("HF_TOKEN"), "{message}");

    let wrong = HubOptions {
        token: Some("hf_bad".into()),
        ..anonymous.clone()
    };
    let err = resolve(&hub("org/gated", "main"), &wrong).err();
    assert!(
        matches!(err, Some(Error::HubUnauthorized { status: 403, .. })),
        "{err:?}"
    );

    server.clear_requests();
    let good = HubOptions {
        token: Some("hf_good".into()),
        ..anonymous
    };
    let files = resolve(&hub("org/gated", "main"), &good)?;
    assert_eq!(
        read(&files.config),
        read(&fixture("qwen2").join("config.json"))
    );
    let asked = server.requests();
    assert!(!asked.is_empty());
    for request in asked.iter().filter(|r| r.path.contains("/resolve/")) {
        assert_eq!(
            request.header("Authorization"),
            Some("Bearer hf_good"),
            "{}",
            request.path
        );
    }
    Ok(())
}

#[test]
fn missing_repo_is_not_found_with_or_without_a_token() -> TestResult {
    let server = HubServer::builder()
        .repo("org/real", "main", COMMIT_A, &fixture("qwen2"))
        .start();
    let cache = tempfile::tempdir()?;
    let anonymous = options(&server, cache.path());

    // Without a token the Hub answers 401 for a missing repo, lest it reveal a
    // private one; its X-Error-Code still says "not found".
    let err = resolve(&hub("org/nope", "main"), &anonymous).err();
    assert!(matches!(&err, Some(Error::HubNotFound { .. })), "{err:?}");
    let message = err.map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("repository org/nope"), "{message}");
    assert!(message.contains("HF_TOKEN"), "{message}");
    assert!(
        message.contains("/org/nope/resolve/main/config.json"),
        "{message}"
    );

    let with_token = HubOptions {
        token: Some("hf_any".into()),
        ..anonymous
    };
    let err = resolve(&hub("org/nope", "main"), &with_token).err();
    let message = err.map(|e| e.to_string()).unwrap_or_default();
    assert!(
        message.starts_with("repository org/nope was not found"),
        "{message}"
    );
    // Nothing is left behind in the cache for a repo that does not exist.
    assert!(!cache.path().join("models--org--nope/snapshots").exists());
    Ok(())
}

#[test]
fn missing_revision_is_not_found() -> TestResult {
    let server = HubServer::builder()
        .repo("org/real", "main", COMMIT_A, &fixture("qwen2"))
        .start();
    let cache = tempfile::tempdir()?;

    let err = resolve(&hub("org/real", "v9"), &options(&server, cache.path())).err();
    assert!(matches!(&err, Some(Error::HubNotFound { .. })), "{err:?}");
    let message = err.map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("revision 'v9' of org/real"), "{message}");
    Ok(())
}

#[test]
fn repo_without_config_is_not_found_naming_the_file() -> TestResult {
    let repo = repo_dir(&[("model.safetensors", "weights")])?;
    let server = HubServer::builder()
        .repo("org/gguf", "main", COMMIT_A, repo.path())
        .start();
    let cache = tempfile::tempdir()?;

    let err = resolve(&hub("org/gguf", "main"), &options(&server, cache.path())).err();
    let message = err.map(|e| e.to_string()).unwrap_or_default();
    assert!(
        message.starts_with("config.json in org/gguf at revision 'main' was not found"),
        "{message}"
    );
    Ok(())
}

#[test]
fn a_plain_mirror_without_error_codes_still_maps_statuses() -> TestResult {
    let bare = repo_dir(&[("config.json", "{}"), ("model.safetensors", "weights")])?;
    let server = HubServer::builder()
        .plain_errors()
        .repo("org/bare", "main", COMMIT_A, bare.path())
        .repo("org/gated", "main", COMMIT_B, bare.path())
        .gated("org/gated", "hf_good")
        .start();
    let cache = tempfile::tempdir()?;
    let opts = options(&server, cache.path());

    // A bare 404 for config.json: the repo or the revision is wrong.
    let err = resolve(&hub("org/nope", "main"), &opts).err();
    assert!(matches!(&err, Some(Error::HubNotFound { .. })), "{err:?}");
    let message = err.map(|e| e.to_string()).unwrap_or_default();
    assert!(
        message.contains("repository org/nope or its revision 'main'"),
        "{message}"
    );

    let err = resolve(&hub("org/gated", "main"), &opts).err();
    assert!(
        matches!(err, Some(Error::HubUnauthorized { status: 401, .. })),
        "{err:?}"
    );

    // Bare 404s for optional files are absences too; without a commit to
    // record them under, the next run asks for them again, and only them.
    let files = resolve(&hub("org/bare", "main"), &opts)?;
    assert_eq!(files.tokenizer, None);
    server.clear_requests();
    resolve(&hub("org/bare", "main"), &opts)?;
    let mut asked = hub_requests(&server);
    asked.sort();
    assert_eq!(
        asked,
        [
            "/org/bare/resolve/main/chat_template.jinja",
            "/org/bare/resolve/main/generation_config.json",
            "/org/bare/resolve/main/model.safetensors.index.json",
            "/org/bare/resolve/main/tokenizer.json",
            "/org/bare/resolve/main/tokenizer_config.json",
        ]
    );
    Ok(())
}

#[test]
fn offline_is_served_from_the_cache_without_a_request() -> TestResult {
    let cache = tempfile::tempdir()?;
    let (online_files, endpoint) = {
        let server = HubServer::builder()
            .repo("org/llama", "main", COMMIT_A, &fixture("llama"))
            .start();
        let opts = options(&server, cache.path());
        let files = resolve(&hub("org/llama", "main"), &opts)?;

        server.clear_requests();
        let offline = HubOptions {
            offline: true,
            ..opts
        };
        assert_eq!(resolve(&hub("org/llama", "main"), &offline)?, files);
        assert_eq!(server.requests().len(), 0);
        (files, server.endpoint())
        // The server stops here.
    };

    let offline = HubOptions {
        endpoint,
        token: None,
        cache_dir: cache.path().to_path_buf(),
        offline: true,
        progress: false,
    };
    assert_eq!(resolve(&hub("org/llama", "main"), &offline)?, online_files);
    Ok(())
}

#[test]
fn offline_with_nothing_cached_is_offline_not_cached() -> TestResult {
    let server = HubServer::builder()
        .repo("org/llama", "main", COMMIT_A, &fixture("llama"))
        .start();
    let cache = tempfile::tempdir()?;
    let offline = HubOptions {
        offline: true,
        ..options(&server, cache.path())
    };

    let err = resolve(&hub("org/llama", "main"), &offline).err();
    match &err {
        Some(Error::OfflineNotCached {
            repo,
            revision,
            file,
            cache: at,
        }) => {
            assert_eq!(
                (repo.as_str(), revision.as_str(), file.as_str()),
                ("org/llama", "main", "config.json")
            );
            assert_eq!(at, cache.path());
        }
        other => panic!("expected OfflineNotCached, got {other:?}"),
    }
    let message = err.map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("HF_HUB_OFFLINE"), "{message}");
    assert_eq!(server.requests().len(), 0);
    Ok(())
}

#[test]
fn offline_with_the_weights_not_cached_names_them() -> TestResult {
    let repo = repo_dir(&[("config.json", "{}"), ("model.safetensors", "weights")])?;
    let cache = tempfile::tempdir()?;
    {
        // A failed download leaves the config cached and the weights not.
        let server = HubServer::builder()
            .repo("org/half", "main", COMMIT_A, repo.path())
            .fail("model.safetensors", 500)
            .start();
        let err = resolve(&hub("org/half", "main"), &options(&server, cache.path())).err();
        assert!(
            matches!(&err, Some(Error::Hub { file, .. }) if file == "model.safetensors"),
            "{err:?}"
        );
        let message = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("HTTP 500"), "{message}");
    }

    let server = HubServer::builder().start();
    let offline = HubOptions {
        offline: true,
        ..options(&server, cache.path())
    };
    let err = resolve(&hub("org/half", "main"), &offline).err();
    assert!(
        matches!(&err, Some(Error::OfflineNotCached { file, .. }) if file == "model.safetensors"),
        "{err:?}"
    );
    Ok(())
}

#[test]
fn an_error_other_than_404_on_an_optional_file_is_an_error() -> TestResult {
    let server = HubServer::builder()
        .repo("org/qwen2", "main", COMMIT_A, &fixture("qwen2"))
        .fail("tokenizer.json", 500)
        .start();
    let cache = tempfile::tempdir()?;

    let err = resolve(&hub("org/qwen2", "main"), &options(&server, cache.path())).err();
    match &err {
        Some(Error::Hub {
            repo,
            file,
            message,
        }) => {
            assert_eq!(
                (repo.as_str(), file.as_str()),
                ("org/qwen2", "tokenizer.json")
            );
            assert!(message.contains("HTTP 500"), "{message}");
        }
        other => panic!("expected Error::Hub, got {other:?}"),
    }
    Ok(())
}

#[test]
fn an_unreachable_endpoint_is_a_hub_error() -> TestResult {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let cache = tempfile::tempdir()?;
    let opts = HubOptions {
        endpoint: format!("http://127.0.0.1:{port}"),
        token: None,
        cache_dir: cache.path().to_path_buf(),
        offline: false,
        progress: false,
    };

    let err = resolve(&hub("org/any", "main"), &opts).err();
    match &err {
        Some(Error::Hub { file, message, .. }) => {
            assert_eq!(file, "config.json");
            assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
        }
        other => panic!("expected Error::Hub, got {other:?}"),
    }
    Ok(())
}

#[test]
fn malformed_index_is_a_json_error_naming_the_file() -> TestResult {
    let repo = repo_dir(&[
        ("config.json", "{}"),
        ("model.safetensors.index.json", "{\"weight_map\": "),
    ])?;

    let local = resolve(
        &ModelSource::Local(repo.path().to_path_buf()),
        &unused_options(),
    )
    .err();
    assert!(
        matches!(&local, Some(Error::Json { path, .. }) if path == &repo.path().join("model.safetensors.index.json")),
        "{local:?}"
    );

    let server = HubServer::builder()
        .repo("org/broken", "main", COMMIT_A, repo.path())
        .start();
    let cache = tempfile::tempdir()?;
    let remote = resolve(&hub("org/broken", "main"), &options(&server, cache.path())).err();
    let index = snapshot(cache.path(), "models--org--broken", COMMIT_A)
        .join("model.safetensors.index.json");
    assert!(
        matches!(&remote, Some(Error::Json { path, .. }) if path == &index),
        "{remote:?}"
    );
    let message = remote.map(|e| e.to_string()).unwrap_or_default();
    assert!(
        message.contains("model.safetensors.index.json"),
        "{message}"
    );
    Ok(())
}

/// Options for local folders, which must not use them: an endpoint nothing
/// listens on and a cache folder that does not exist.
fn unused_options() -> HubOptions {
    HubOptions {
        endpoint: "http://127.0.0.1:9".to_string(),
        token: None,
        cache_dir: PathBuf::from("/nonexistent/hub-cache"),
        offline: false,
        progress: false,
    }
}

#[test]
fn local_folders_follow_the_same_rules() -> TestResult {
    let llama = fixture("llama");
    let files = resolve(
        &ModelSource::parse(&llama.to_string_lossy(), None)?,
        &unused_options(),
    )?;
    assert_eq!(files.config, llama.join("config.json"));
    assert_eq!(files.tokenizer, Some(llama.join("tokenizer.json")));
    assert_eq!(
        files.weights,
        [1, 2, 3].map(|i| llama.join(format!("model-0000{i}-of-00003.safetensors")))
    );

    let qwen2 = fixture("qwen2");
    let files = resolve(&ModelSource::Local(qwen2.clone()), &unused_options())?;
    assert_eq!(files.weights, [qwen2.join("model.safetensors")]);

    let bare = repo_dir(&[("config.json", "{}"), ("model.safetensors", "w")])?;
    let files = resolve(
        &ModelSource::Local(bare.path().to_path_buf()),
        &unused_options(),
    )?;
    assert_eq!(
        (
            files.generation_config,
            files.tokenizer,
            files.tokenizer_config
        ),
        (None, None, None)
    );

    let missing = |files: &[(&str, &str)], expected: &str| -> TestResult {
        let dir = repo_dir(files)?;
        let err = resolve(
            &ModelSource::Local(dir.path().to_path_buf()),
            &unused_options(),
        )
        .err();
        assert!(
            matches!(&err, Some(Error::MissingFile { dir: d, file }) if d == dir.path() && file == expected),
            "{err:?}"
        );
        let message = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(
            message.contains(expected) && message.contains(&*dir.path().to_string_lossy()),
            "{message}"
        );
        Ok(())
    };
    missing(&[("model.safetensors", "w")], "config.json")?;
    missing(&[("config.json", "{}")], "model.safetensors")?;
    missing(
        &[
            ("config.json", "{}"),
            (
                "model.safetensors.index.json",
                r#"{"weight_map": {"a": "shard-1.safetensors"}}"#,
            ),
        ],
        "shard-1.safetensors",
    )?;
    Ok(())
}
