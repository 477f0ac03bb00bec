//! `hesscope train` runs that cannot lie: divergence stops the run naming
//! the epoch, step and tensor and writes no non-finite file; every
//! checkpoint's files are verified by their SHA-256 on `--resume`; one run
//! per output folder (a refusal, `--overwrite`, a lock); a closed stdout
//! does not stop the training; and a run killed at random points (in a
//! step, in a checkpoint write) 20 times resumes each time to the bytes of
//! an uninterrupted run.

mod common;
use common::*;
use hesscope::model::tensorio;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "train",
        "--backend",
        "cpu",
        "--model",
        "cnn-tiny",
        "--samples",
        "48",
        "--batch",
        "16",
        "--epochs",
        "3",
        "--lr",
        "0.05",
        "--weight-decay",
        "1e-4",
        "--seed",
        "5",
        "--out",
        out.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn resume_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = args(out, extra);
    a.extend(["--resume".to_string(), out.to_str().unwrap().to_string()]);
    a
}

/// Every float tensor of every safetensors file under `dir` is finite.
fn all_finite(dir: &Path) -> Vec<String> {
    let mut bad = vec![];
    let mut files = vec![];
    for d in [dir.to_path_buf(), dir.join("checkpoints")] {
        if let Ok(rd) = std::fs::read_dir(&d) {
            files.extend(
                rd.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "safetensors")),
            );
        }
    }
    for f in files {
        let file = tensorio::File::open(&f).unwrap();
        for name in file.layout().keys() {
            let t = file.tensor(name).unwrap();
            if t.data
                .iter()
                .any(|x| !x.is_finite() || (*x as f32).is_infinite())
            {
                bad.push(format!("{}: {name}", f.display()));
            }
        }
    }
    bad
}

#[test]
fn divergence_stops_the_run_naming_epoch_step_tensor_and_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, extra) in [
        vec!["--lr", "1e6"],
        vec!["--weight-decay", "1e10"],
        vec!["--lr", "1e50"],
        vec!["--lr", "1e150"],
        // Diverging in epoch 2 (lr × 1e9 at the milestone).
        vec!["--milestones", "1", "--lr-gamma", "1e9"],
    ]
    .into_iter()
    .enumerate()
    {
        let out = tmp.path().join(format!("d{i}"));
        let mut a = args(&out, &[]);
        let p = a.iter().position(|x| x == "--epochs").unwrap();
        a[p + 1] = "6".into();
        // A flag given replaces the default one.
        for pair in extra.chunks(2) {
            if let Some(p) = a.iter().position(|x| x == pair[0]) {
                a[p + 1] = pair[1].into();
            } else {
                a.extend(pair.iter().map(|s| s.to_string()));
            }
        }
        let (ok, _, stderr) = hesscope(&a);
        println!("{extra:?}: {}", stderr.trim());
        assert!(!ok, "{extra:?} exited 0");
        let e: usize = stderr
            .split("diverged in epoch ")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{extra:?}: no epoch named: {stderr}"));
        assert!(stderr.contains(", step "), "{stderr}");
        assert!(stderr.contains(": `"), "no tensor named: {stderr}");
        let good = if e == 1 {
            "none".to_string()
        } else {
            out.join(format!("checkpoints/epoch-{}.safetensors", e - 1))
                .display()
                .to_string()
        };
        assert!(
            stderr.contains(&format!("last good checkpoint: {good}")),
            "{extra:?}: {stderr}"
        );
        if e > 1 {
            assert!(out
                .join(format!("checkpoints/epoch-{}.json", e - 1))
                .exists());
        }
        assert!(!out.join(format!("checkpoints/epoch-{e}.json")).exists());
        assert!(!out
            .join(format!("checkpoints/epoch-{e}.safetensors"))
            .exists());
        assert!(!out.join("final.safetensors").exists());
        assert_eq!(all_finite(&out), Vec::<String>::new());
        if extra[0] == "--milestones" {
            assert_eq!(e, 2, "{stderr}");
        }
    }
}

fn flip_last_byte(p: &Path) {
    let mut b = std::fs::read(p).unwrap();
    let n = b.len() - 1;
    b[n] ^= 0x40;
    std::fs::write(p, b).unwrap();
}

fn fifo(p: &Path) {
    std::fs::remove_file(p).unwrap();
    assert!(Command::new("mkfifo").arg(p).status().unwrap().success());
}

fn final_files(d: &Path) -> Vec<Vec<u8>> {
    [
        "final.safetensors",
        "final.f64.safetensors",
        "final.optim.safetensors",
    ]
    .iter()
    .map(|f| std::fs::read(d.join(f)).unwrap())
    .collect()
}

#[test]
fn resume_verifies_every_file_of_a_checkpoint_and_its_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let clean = tmp.path().join("clean");
    let (ok, _, stderr) = hesscope(&args(&clean, &[]));
    assert!(ok, "{stderr}");
    let want = final_files(&clean);
    // The JSON stays small: epoch 3's is no larger than epoch 2's (it held
    // the whole trajectory so far before).
    let size = |e: usize| {
        std::fs::metadata(clean.join(format!("checkpoints/epoch-{e}.json")))
            .unwrap()
            .len()
    };
    println!("json sizes: {} {} {}", size(1), size(2), size(3));
    assert!(size(3) * 10 <= size(2) * 11, "{} > {}", size(3), size(2));
    // One damaged file of epoch 3 at a time: the resume passes over epoch 3
    // naming that file, redoes it from epoch 2 and ends at the same bytes.
    type Hurt = Box<dyn Fn(&Path)>;
    let damage: Vec<(&str, Hurt)> = vec![
        (
            "epoch-3.optim.safetensors",
            Box::new(|ck: &Path| flip_last_byte(&ck.join("epoch-3.optim.safetensors"))),
        ),
        (
            "epoch-3.f64.safetensors",
            Box::new(|ck: &Path| flip_last_byte(&ck.join("epoch-3.f64.safetensors"))),
        ),
        (
            "epoch-3.safetensors",
            Box::new(|ck: &Path| flip_last_byte(&ck.join("epoch-3.safetensors"))),
        ),
        (
            "epoch-3.json",
            Box::new(|ck: &Path| {
                // A crafted JSON: epoch 2's, claiming to be epoch 3.
                let t = std::fs::read_to_string(ck.join("epoch-2.json")).unwrap();
                let mut j: serde_json::Value = serde_json::from_str(&t).unwrap();
                j["epoch"] = 3.into();
                std::fs::write(ck.join("epoch-3.json"), j.to_string()).unwrap();
            }),
        ),
        (
            // A FIFO in place of a file: refused from its metadata, no hang.
            "epoch-3.optim.safetensors",
            Box::new(|ck: &Path| fifo(&ck.join("epoch-3.optim.safetensors"))),
        ),
        (
            "epoch-3.json",
            Box::new(|ck: &Path| fifo(&ck.join("epoch-3.json"))),
        ),
        (
            "epoch-2.json",
            Box::new(|ck: &Path| {
                // Epoch 2's record changed: epoch 3's link to it breaks.
                let p = ck.join("epoch-2.json");
                let t = std::fs::read_to_string(&p).unwrap();
                std::fs::write(&p, t.replacen("\"train_loss\": ", "\"train_loss\": 1", 1)).unwrap();
            }),
        ),
    ];
    for (i, (file, hurt)) in damage.iter().enumerate() {
        let d = tmp.path().join(format!("r{i}"));
        let (ok, _, stderr) = hesscope(&args(&d, &[]));
        assert!(ok, "{stderr}");
        std::fs::remove_file(d.join("final.json")).unwrap();
        hurt(&d.join("checkpoints"));
        let (ok, stdout, stderr) = hesscope(&resume_args(&d, &[]));
        println!("{file}: {}", stderr.trim());
        assert!(ok, "{file}: {stderr}");
        assert!(stderr.contains("ignoring checkpoint"), "{file}: {stderr}");
        assert!(stderr.contains(file), "{file} not named: {stderr}");
        let from = if *file == "epoch-2.json" { 1 } else { 2 };
        assert!(
            stdout.contains(&format!("after epoch {from}")),
            "{file}: {stdout}"
        );
        assert!(final_files(&d) == want, "{file}: the final files differ");
    }
}

#[test]
fn one_run_per_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let (ok, _, stderr) = hesscope(&args(&out, &[]));
    assert!(ok, "{stderr}");
    // A fresh run into it is refused, naming what it holds and the way out.
    let mut two = args(&out, &[]);
    let p = two.iter().position(|x| x == "--epochs").unwrap();
    two[p + 1] = "2".into();
    let (ok, _, stderr) = hesscope(&two);
    assert!(!ok);
    assert!(
        stderr.contains("another run's files") && stderr.contains("--overwrite"),
        "{stderr}"
    );
    assert!(out.join("checkpoints/epoch-3.json").exists());
    // With --overwrite the old run's files go first: no epoch 3 is left.
    two.push("--overwrite".into());
    let (ok, _, stderr) = hesscope(&two);
    assert!(ok, "{stderr}");
    assert!(!out.join("checkpoints/epoch-3.json").exists());
    assert!(!out.join("checkpoints/epoch-3.safetensors").exists());
    assert!(out.join("checkpoints/epoch-2.json").exists());
    // --resume with another model or recipe says which.
    let mut other = resume_args(&out, &[]);
    let p = other.iter().position(|x| x == "--model").unwrap();
    other[p + 1] = "mlp-tiny".into();
    let (ok, _, stderr) = hesscope(&other);
    assert!(!ok);
    assert!(
        stderr.contains("--model mlp-tiny, the run's is cnn-tiny"),
        "{stderr}"
    );
    let mut other = resume_args(&out, &[]);
    let p = other.iter().position(|x| x == "--lr").unwrap();
    other[p + 1] = "0.1".into();
    let (ok, _, stderr) = hesscope(&other);
    assert!(!ok);
    assert!(
        stderr.contains("other settings") && stderr.contains("lr: 0.1"),
        "{stderr}"
    );
    // A run holding the lock excludes another on the folder.
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .open(out.join("train.lock"))
        .unwrap();
    lock.try_lock().unwrap();
    let (ok, _, stderr) = hesscope(&resume_args(&out, &[]));
    assert!(!ok);
    assert!(stderr.contains("another hesscope train"), "{stderr}");
    drop(lock);
    // Two processes started together on one folder: exactly one succeeds,
    // with the result of a run alone.
    let solo = tmp.path().join("solo");
    let (ok, _, stderr) = hesscope(&args(&solo, &[]));
    assert!(ok, "{stderr}");
    for k in 0..4 {
        let d = tmp.path().join(format!("pair{k}"));
        let spawn = || {
            Command::new(env!("CARGO_BIN_EXE_hesscope"))
                .args(args(&d, &[]))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (a, b) = (spawn(), spawn());
        let (ra, rb) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
        let oks = [&ra, &rb].iter().filter(|o| o.status.success()).count();
        assert_eq!(
            oks,
            1,
            "{}\n{}",
            String::from_utf8_lossy(&ra.stderr),
            String::from_utf8_lossy(&rb.stderr)
        );
        assert!(final_files(&d) == final_files(&solo));
    }
}

#[test]
fn resume_tells_apart_another_architecture_or_other_data_under_the_same_names() {
    let tmp = tempfile::tempdir().unwrap();
    let arch = tmp.path().join("m.arch");
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("models/cnn-tiny.arch"))
            .unwrap();
    std::fs::write(&arch, &text).unwrap();
    let data = tmp.path().join("d.safetensors");
    let synth = |seed: &str| {
        let (ok, _, stderr) = hesscope(&[
            "synth",
            "--model",
            "cnn-tiny",
            "--samples",
            "48",
            "--seed",
            seed,
            "--out",
            data.to_str().unwrap(),
        ]);
        assert!(ok, "{stderr}");
    };
    synth("1");
    let out = tmp.path().join("run");
    let mut a = args(&out, &["--data", data.to_str().unwrap()]);
    let p = a.iter().position(|x| x == "--model").unwrap();
    a[p + 1] = arch.to_str().unwrap().into();
    let (ok, _, stderr) = hesscope(&a);
    assert!(ok, "{stderr}");
    let mut r = a.clone();
    r.extend(["--resume".to_string(), out.to_str().unwrap().to_string()]);
    // The same file names, other samples: refused, naming --data.
    synth("2");
    let (ok, _, stderr) = hesscope(&r);
    assert!(!ok);
    assert!(stderr.contains("holds other samples"), "{stderr}");
    synth("1");
    // The same architecture path, another activation (same tensors).
    std::fs::write(&arch, text.replacen("relu", "leaky_relu", 1)).unwrap();
    let (ok, _, stderr) = hesscope(&r);
    assert!(!ok);
    assert!(stderr.contains("is not the architecture"), "{stderr}");
    std::fs::write(&arch, &text).unwrap();
    // Measured otherwise: a test set, or the curvature, the run had not.
    for extra in [
        vec!["--test-data", data.to_str().unwrap()],
        vec!["--spectrum-every", "1", "--steps", "5", "--runs", "1"],
    ] {
        let mut m = r.clone();
        m.extend(extra.iter().map(|s| s.to_string()));
        let (ok, _, stderr) = hesscope(&m);
        assert!(!ok, "{extra:?}");
        assert!(stderr.contains("the measurements"), "{stderr}");
    }
    let (ok, _, stderr) = hesscope(&r);
    assert!(ok, "{stderr}");
}

#[test]
fn a_closed_stdout_does_not_stop_the_training() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("piped");
    let mut child = Command::new(env!("CARGO_BIN_EXE_hesscope"))
        .args(args(&out, &[]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("stdout was closed"), "{stderr}");
    let clean = tmp.path().join("clean");
    let (ok, _, stderr) = hesscope(&args(&clean, &[]));
    assert!(ok, "{stderr}");
    assert!(final_files(&out) == final_files(&clean));
    assert_eq!(
        json(out.join("trajectory.json"))["finished"],
        serde_json::Value::Bool(true)
    );
}

#[test]
fn a_non_utf8_out_is_refused_before_training() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join(std::ffi::OsStr::from_bytes(b"run-\xff"));
    let mut a: Vec<std::ffi::OsString> = args(Path::new("x"), &[])
        .into_iter()
        .map(Into::into)
        .collect();
    let n = a.len();
    a[n - 1] = bad.clone().into();
    let t = Instant::now();
    let (ok, _, stderr) = hesscope(&a);
    assert!(!ok);
    assert!(
        stderr.contains("--out") && stderr.contains("UTF-8"),
        "{stderr}"
    );
    assert!(!bad.exists());
    assert!(t.elapsed() < Duration::from_secs(20));
}

/// A tiny xorshift, so the kill points are reproducible from the seed
/// printed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Whether a checkpoint write is in progress (a `.tmp` beside its files).
fn writing(dir: &Path) -> bool {
    [dir.to_path_buf(), dir.join("checkpoints")]
        .iter()
        .any(|d| {
            std::fs::read_dir(d).is_ok_and(|rd| {
                rd.filter_map(|e| e.ok())
                    .any(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            })
        })
}

#[test]
fn killed_at_twenty_random_points_each_run_resumes_to_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let long = |out: &Path| {
        let mut a = args(out, &["--milestones", "2", "--augment", "crop-flip"]);
        let p = a.iter().position(|x| x == "--epochs").unwrap();
        a[p + 1] = "6".into();
        a
    };
    let clean = tmp.path().join("clean");
    let t = Instant::now();
    let (ok, _, stderr) = hesscope(&long(&clean));
    assert!(ok, "{stderr}");
    let span = t.elapsed().as_micros() as u64;
    let want = final_files(&clean);
    let want_losses = json(clean.join("trajectory.json"))["step_losses"].clone();
    let seed = std::env::var("KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("KILL_SEED={seed}; an uninterrupted run takes {span} µs");
    let mut rng = Rng(seed);
    let (mut in_write, mut resumed_from) = (0, vec![]);
    for i in 0..20 {
        let d: PathBuf = tmp.path().join(format!("k{i}"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_hesscope"))
            .args(long(&d))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Half the kills at a random time, half at a random checkpoint
        // write (the n-th `.tmp` seen).
        let t0 = Instant::now();
        let at = Duration::from_micros(rng.below(span));
        let nth_write = (i % 2 == 1).then(|| rng.below(36));
        let mut writes_seen = 0;
        let mut was_writing = false;
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            match nth_write {
                Some(n) => {
                    let w = writing(&d);
                    if w && !was_writing {
                        if writes_seen == n {
                            in_write += 1;
                            break;
                        }
                        writes_seen += 1;
                    }
                    was_writing = w;
                }
                None if t0.elapsed() >= at => break,
                None => {}
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let _ = child.kill();
        child.wait().unwrap();
        let done = latest_epoch(&d);
        resumed_from.push(done);
        // Resume; with no complete checkpoint yet, start over.
        let a = if done == 0 {
            let mut a = long(&d);
            a.push("--overwrite".into());
            a
        } else {
            let mut a = long(&d);
            a.extend(["--resume".to_string(), d.to_str().unwrap().to_string()]);
            a
        };
        let (ok, _, stderr) = hesscope(&a);
        assert!(ok, "kill {i} (after epoch {done}): {stderr}");
        assert!(
            final_files(&d) == want,
            "kill {i} (after epoch {done}): the final files differ"
        );
        assert_eq!(
            json(d.join("trajectory.json"))["step_losses"],
            want_losses,
            "kill {i}"
        );
    }
    println!("killed after epochs {resumed_from:?}, {in_write} in a checkpoint write");
}
