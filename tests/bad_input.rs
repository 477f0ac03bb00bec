//! Crafted bad input, run through the built binary: architecture files
//! (every keyword × bad options), weights, directions and data as
//! safetensors (wrong names, dtypes, shapes, values, truncated and
//! corrupted headers, FIFOs and devices in their place), CIFAR folders,
//! every flag × bad values, and outputs that cannot be written.
//!
//! Every case must end with exit code 1 (or clap's 2 for a usage error),
//! no panic and no abort, a stderr that names the file, tensor, layer or
//! flag, and no raw terminal control character; each runs under a 20 s
//! timeout so a hang fails. A closed stdout must end quietly with 0.
//! `BAD_INPUT_LOG=1 cargo test --test bad_input -- --nocapture` prints
//! every case's stderr.

use hesscope::model::Model;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(20);

/// What a case expects.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    /// Exit 1 (or 2 for clap's usage errors), stderr naming every needle.
    Fail,
    /// Exit 0 with nothing on stderr that looks like a failure.
    Quiet,
}

#[derive(Clone, Copy, Debug)]
enum Out {
    Piped,
    /// stdout's read end is closed before the command writes.
    Closed,
    /// stdout is /dev/full.
    Full,
}

#[derive(Clone, Debug)]
struct Case {
    name: String,
    args: Vec<String>,
    needles: Vec<String>,
    expect: Expect,
    stdout: Out,
}

fn case(name: impl Into<String>, args: &[&str], needles: &[&str]) -> Case {
    Case {
        name: name.into(),
        args: args.iter().map(|s| s.to_string()).collect(),
        needles: needles.iter().map(|s| s.to_string()).collect(),
        expect: Expect::Fail,
        stdout: Out::Piped,
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

struct Outcome {
    code: Option<i32>,
    stderr: String,
    timed_out: bool,
    seconds: f64,
}

fn run(c: &Case) -> Outcome {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hesscope"));
    cmd.args(&c.args)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .env("RUST_LOG", "off");
    match c.stdout {
        Out::Piped | Out::Closed => {
            cmd.stdout(Stdio::piped());
        }
        Out::Full => {
            cmd.stdout(std::fs::File::create("/dev/full").unwrap());
        }
    }
    let t = Instant::now();
    let mut child = cmd.spawn().expect("the hesscope binary runs");
    let out_reader = child.stdout.take().map(|mut o| {
        if matches!(c.stdout, Out::Closed) {
            drop(o);
            return std::thread::spawn(String::new);
        }
        std::thread::spawn(move || {
            let mut buf = String::new();
            let _ = o.read_to_string(&mut buf);
            buf
        })
    });
    let mut err = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).to_string()
    });
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t.elapsed() > TIMEOUT {
            timed_out = true;
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    if let Some(r) = out_reader {
        let _ = r.join();
    }
    Outcome {
        code: status.code(),
        stderr: err_reader.join().unwrap_or_default(),
        timed_out,
        seconds: t.elapsed().as_secs_f64(),
    }
}

/// Everything wrong with one case's outcome, if anything.
fn judge(c: &Case, o: &Outcome) -> Option<String> {
    let mut why = vec![];
    if o.timed_out {
        why.push(format!("no exit within {TIMEOUT:?} (a hang)"));
    }
    if o.stderr.contains("panicked") || o.code == Some(101) {
        why.push("panicked".into());
    }
    if o.code.is_none() && !o.timed_out {
        why.push("killed by a signal (abort?)".into());
    }
    if o.stderr.contains('\u{1b}') || o.stderr.contains('\u{7}') {
        why.push("raw terminal control characters on stderr".into());
    }
    match c.expect {
        Expect::Fail => {
            if !matches!(o.code, Some(1) | Some(2)) {
                why.push(format!("exit code {:?}, expected 1 (or 2)", o.code));
            }
            for n in &c.needles {
                if !o.stderr.contains(n.as_str()) {
                    why.push(format!("stderr does not name `{n}`"));
                }
            }
        }
        Expect::Quiet => {
            if o.code != Some(0) {
                why.push(format!("exit code {:?}, expected 0", o.code));
            }
            // Mesa's EGL prints an XDG_RUNTIME_DIR complaint of its own.
            let ours = o.stderr.lines().filter(|l| !l.contains("XDG_RUNTIME_DIR"));
            if ours.clone().any(|l| l.contains("error")) {
                why.push("an error on stderr".into());
            }
        }
    }
    if why.is_empty() {
        None
    } else {
        Some(format!(
            "{}: {}\n    args: {:?}\n    exit {:?} in {:.2} s\n    stderr: {}",
            c.name,
            why.join("; "),
            c.args,
            o.code,
            o.seconds,
            o.stderr.trim()
        ))
    }
}

/// Run every case on two threads; fail with every bad outcome listed.
fn check_all(cases: Vec<Case>) {
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(vec![]);
    let slowest = Mutex::new((0.0f64, String::new()));
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(c) = cases.get(i) else { break };
                let o = run(c);
                if std::env::var_os("BAD_INPUT_LOG").is_some() {
                    eprintln!("[{}] exit {:?}: {}", c.name, o.code, o.stderr.trim());
                }
                if let Some(f) = judge(c, &o) {
                    failures.lock().unwrap().push(f);
                }
                let mut sl = slowest.lock().unwrap();
                if o.seconds > sl.0 {
                    *sl = (o.seconds, c.name.clone());
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    let (t, name) = slowest.into_inner().unwrap();
    eprintln!(
        "{} cases, {} failed; slowest {name} ({t:.2} s)",
        cases.len(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

// ---- safetensors crafted byte by byte -----------------------------------

/// One tensor to write: name, dtype (as the header spells it), shape, bytes.
type Spec = (String, String, Vec<usize>, Vec<u8>);

/// A safetensors file from (name, dtype, shape, data bytes), in order.
fn st_bytes(tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, dtype, shape, data) in tensors {
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + data.len()]}),
        );
        offset += data.len();
    }
    let mut h = serde_json::Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    for (_, _, _, d) in tensors {
        out.extend(d);
    }
    out
}

fn f32s(n: usize, v: f32) -> Vec<u8> {
    (0..n).flat_map(|_| v.to_le_bytes()).collect()
}

/// Bytes of `n` elements of `dtype` (all small valid values).
fn elems(dtype: &str, n: usize) -> Vec<u8> {
    let size = match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        _ => 1,
    };
    if dtype == "F32" {
        return f32s(n, 0.01);
    }
    vec![0u8; n * size]
}

/// mlp-tiny's trainable tensors (name, shape).
fn mlp_params() -> Vec<(String, Vec<usize>)> {
    Model::load("mlp-tiny")
        .unwrap()
        .params
        .iter()
        .map(|p| (p.name.clone(), p.shape.clone()))
        .collect()
}

fn mlp_weights() -> Vec<Spec> {
    mlp_params()
        .into_iter()
        .map(|(n, shape)| {
            let len = shape.iter().product();
            (n, "F32".to_string(), shape, f32s(len, 0.01))
        })
        .collect()
}

fn write_st(path: &Path, t: &[Spec]) {
    let v: Vec<(&str, &str, Vec<usize>, Vec<u8>)> = t
        .iter()
        .map(|(n, d, s, b)| (n.as_str(), d.as_str(), s.clone(), b.clone()))
        .collect();
    std::fs::write(path, st_bytes(&v)).unwrap();
}

/// Data for mlp-tiny: x [n, 1, 6, 6], y [n] I64 labels 0..4.
fn mlp_data(n: usize) -> Vec<Spec> {
    vec![
        (
            "x".into(),
            "F32".into(),
            vec![n, 1, 6, 6],
            f32s(n * 36, 0.5),
        ),
        (
            "y".into(),
            "I64".into(),
            vec![n],
            (0..n)
                .flat_map(|i| ((i % 4) as i64).to_le_bytes())
                .collect(),
        ),
    ]
}

fn mkfifo(path: &Path) -> bool {
    Command::new("mkfifo")
        .arg(path)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

// ---- the cases ------------------------------------------------------------

const BASE_ARCH: &[&str] = &[
    "model m",
    "input 3 8 8",
    "classes 4",
    "conv c1 4 k=3 pad=1",
    "relu",
    "gap",
    "linear fc 4",
];

/// An architecture: the base with `edit` applied (lines replaced from
/// index `at`, `remove` of them), written to `dir/<name>.arch`.
fn arch_file(dir: &Path, name: &str, at: usize, remove: usize, insert: &[&str]) -> PathBuf {
    let mut lines: Vec<&str> = BASE_ARCH.to_vec();
    lines.splice(at..at + remove, insert.iter().copied());
    let path = dir.join(format!("{name}.arch"));
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn arch_cases(dir: &Path) -> Vec<Case> {
    let mut out = vec![];
    let mut add = |name: &str, at: usize, remove: usize, insert: &[&str], needles: &[&str]| {
        let path = arch_file(dir, name, at, remove, insert);
        let mut n: Vec<&str> = vec!["architecture", name];
        n.extend(needles);
        out.push(case(
            format!("arch {name}"),
            &[
                "grad",
                "--backend",
                "cpu",
                "--samples",
                "4",
                "--model",
                &s(&path),
            ],
            &n,
        ));
    };
    // The conv line (index 3) with every kind of bad option.
    for (i, opts) in [
        "k=0",
        "k=-1",
        "k=abc",
        "k=",
        "k=4294967297",
        "k=18446744073709551615",
        "k=99999999999999999999999",
        "k=3 k=5",
        "k=3 pad=1 pad=1",
        "k=3 pad=100000",
        "k=3 pad=18446744073709551615",
        "k=3 stride=0",
        "k=3 stride=abc",
        "k=3 bias=maybe",
        "k=3 bias=",
        "k=3 foo=1",
        "k=3 =3",
        "k=3 groups=2",
        "k=3 groups=0",
        "k=3 groups=4",
        "k=3 dilation=0",
        "k=3 dilation=abc",
        "k=3 dilation=18446744073709551615",
        "k=3 ceil=true",
        "pad=1",
        "k=9",
    ]
    .iter()
    .enumerate()
    {
        let line = format!("conv c1 4 {opts}");
        add(&format!("conv-opt-{i}"), 3, 1, &[&line], &["line 4"]);
    }
    for (i, line) in [
        "conv c1 0 k=3",
        "conv c1 -4 k=3",
        "conv c1 abc k=3",
        "conv c1 99999999999 k=3",
        "conv c1 18446744073709551615 k=3",
        "conv c1 k=3",
        "conv k=3",
        "conv c1 4 4 k=3",
        "conv a..b 4 k=3",
        "conv .a 4 k=3",
        "conv a/b 4 k=3",
        "conv c\u{1b}[31mred 4 k=3",
        "conv c\u{7}bell 4 k=3",
        "conv c\u{202e}rtl 4 k=3",
    ]
    .iter()
    .enumerate()
    {
        add(&format!("conv-line-{i}"), 3, 1, &[line], &["line 4"]);
    }
    // Layers after `gap` (flat input): PyTorch raises on a 2-D input.
    for (i, line) in [
        "conv c2 4 k=1",
        "bn b2",
        "maxpool k=1",
        "avgpool k=1",
        "gap",
        "basicblock blk 4",
    ]
    .iter()
    .enumerate()
    {
        add(
            &format!("after-gap-{i}"),
            6,
            0,
            &[line],
            &["line 7", "flat"],
        );
        add(
            &format!("after-flatten-{i}"),
            5,
            1,
            &["flatten", line],
            &["line 7", "flat"],
        );
    }
    // Pools with bad options (after relu, index 5).
    for kw in ["maxpool", "avgpool"] {
        for (i, opts) in [
            "",
            "k=0",
            "k=2 pad=2",
            "k=3 pad=2",
            "k=1 pad=1",
            "k=2 stride=0",
            "k=100",
            "k=2 k=2",
            "k=2 foo=1",
            "k=abc",
            "k=2 pad=18446744073709551615",
            "p1 p2 k=2",
            "k=2 ceil=1",
            "k=2 ceil=",
            "k=100 ceil=true",
            "k=3 pad=2 ceil=true",
        ]
        .iter()
        .enumerate()
        {
            let line = format!("{kw} {opts}");
            add(&format!("{kw}-{i}"), 5, 0, &[&line], &["line 6"]);
        }
    }
    // Activations: unknown options, two names, bad slopes.
    for kw in ["relu", "tanh", "sigmoid", "gelu", "silu", "leaky_relu"] {
        add(
            &format!("{kw}-option"),
            4,
            1,
            &[&format!("{kw} k=1")],
            &["line 5", "k"],
        );
        add(
            &format!("{kw}-names"),
            4,
            1,
            &[&format!("{kw} a b")],
            &["line 5", "usage"],
        );
        add(
            &format!("{kw}-badname"),
            4,
            1,
            &[&format!("{kw} a\u{1b}b")],
            &["line 5"],
        );
    }
    for (i, slope) in ["nan", "inf", "-inf", "abc", "", "0.1 slope=0.2"]
        .iter()
        .enumerate()
    {
        let line = format!("leaky_relu slope={slope}");
        add(
            &format!("leaky-slope-{i}"),
            4,
            1,
            &[&line],
            &["line 5", "slope"],
        );
    }
    // An option split by spaces: named as such, not "unknown option ``".
    for (i, line) in [
        "leaky_relu slope = 0.1",
        "leaky_relu slope= 0.1",
        "leaky_relu slope =0.1",
    ]
    .iter()
    .enumerate()
    {
        add(
            &format!("leaky-spaced-{i}"),
            4,
            1,
            &[line],
            &["line 5", "slope=", "without spaces"],
        );
    }
    // bn, gap, flatten, linear.
    add("bn-no-name", 4, 0, &["bn"], &["line 5", "usage"]);
    add("bn-option", 4, 0, &["bn b eps=0"], &["line 5", "eps"]);
    add(
        "bn-unknown-option",
        4,
        0,
        &["bn b momentum=0.1"],
        &["line 5", "momentum"],
    );
    add("gap-option", 5, 1, &["gap k=2"], &["line 6"]);
    add(
        "flatten-option",
        5,
        1,
        &["flatten start_dim=1"],
        &["line 6"],
    );
    add("linear-on-image", 5, 1, &[], &["line 6", "flat input"]);
    for (i, line) in [
        "linear fc 0",
        "linear fc abc",
        "linear fc",
        "linear fc 4 bias=yes",
        "linear fc 4 bias=true bias=false",
        "linear fc 4 out=4",
        "linear fc 99999999999999",
        "linear fc 18446744073709551615",
    ]
    .iter()
    .enumerate()
    {
        add(&format!("linear-{i}"), 6, 1, &[line], &["line 7"]);
    }
    // Residual structure.
    add("residual-open", 4, 0, &["residual r"], &["never closed"]);
    add(
        "shortcut-outside",
        4,
        0,
        &["shortcut"],
        &["line 5", "shortcut"],
    );
    add("end-outside", 4, 0, &["end"], &["line 5", "end"]);
    add(
        "two-shortcuts",
        4,
        0,
        &["residual r", "shortcut", "shortcut", "end"],
        &["line 7", "shortcut"],
    );
    add(
        "residual-mismatch",
        4,
        0,
        &["residual r", "conv c 8 k=1", "end"],
        &["line 7", "main branch"],
    );
    add("residual-noname", 4, 0, &["residual", "end"], &["line 5"]);
    add(
        "shortcut-arg",
        4,
        0,
        &["residual r", "shortcut x", "end"],
        &["line 6"],
    );
    // basicblock.
    for (i, line) in [
        "basicblock b 4 stride=0",
        "basicblock b 4 bn=maybe",
        "basicblock b 4 shortcut=a..b",
        "basicblock b 0",
        "basicblock b",
        "basicblock b 4 stride=2 stride=2",
        "basicblock b 4 k=3",
        "basicblock b 99999999999",
    ]
    .iter()
    .enumerate()
    {
        add(&format!("basicblock-{i}"), 4, 0, &[line], &["line 5"]);
    }
    // Header lines.
    for (i, (at, remove, insert, needles)) in [
        (
            1,
            1,
            vec!["input 3 100000 100000"],
            vec!["line 2", "268435456"],
        ),
        (1, 1, vec!["input 0 8 8"], vec!["line 2"]),
        (1, 1, vec!["input 3 8"], vec!["line 2", "usage"]),
        (1, 1, vec!["input a b c"], vec!["line 2"]),
        (
            1,
            1,
            vec!["input 99999999999 99999999999 99999999999"],
            vec!["line 2", "limit"],
        ),
        (
            1,
            1,
            vec!["input 3 8 8", "input 3 8 8"],
            vec!["line 3", "twice"],
        ),
        (1, 1, vec![], vec!["input"]),
        (2, 1, vec!["classes 1"], vec!["2 classes"]),
        (2, 1, vec!["classes 5"], vec!["5 classes"]),
        (
            2,
            1,
            vec!["classes 4", "classes 4"],
            vec!["line 4", "twice"],
        ),
        (2, 1, vec![], vec!["classes"]),
        (0, 1, vec![], vec!["model NAME"]),
        (0, 1, vec!["model m", "model n"], vec!["line 2", "twice"]),
        (0, 1, vec!["model m\u{1b}[2J"], vec!["line 1"]),
        (0, 1, vec!["model"], vec!["line 1", "usage"]),
        (3, 0, vec!["convv c 4 k=3"], vec!["line 4", "unknown layer"]),
        (3, 0, vec!["Conv c 4 k=3"], vec!["line 4", "unknown layer"]),
        (3, 0, vec!["\u{1b}[31m"], vec!["line 4", "unknown layer"]),
        (3, 4, vec!["flatten"], vec!["4 classes"]),
        (6, 1, vec!["linear fc 8"], vec!["4 classes"]),
        (
            6,
            1,
            vec!["linear fc 4", "relu", "conv c 4 k=1"],
            vec!["flat"],
        ),
    ]
    .into_iter()
    .enumerate()
    {
        add(&format!("header-{i}"), at, remove, &insert, &needles);
    }
    // A model without trainable parameters.
    let p = dir.join("noparams.arch");
    std::fs::write(&p, "model z\ninput 4 1 1\nclasses 4\nflatten\n").unwrap();
    for cmd in ["grad", "exact", "density"] {
        out.push(case(
            format!("arch no parameters ({cmd})"),
            &[cmd, "--backend", "cpu", "--samples", "4", "--model", &s(&p)],
            &["noparams.arch", "no trainable parameters"],
        ));
    }
    // Not an architecture file at all.
    let empty = dir.join("empty.arch");
    std::fs::write(&empty, "").unwrap();
    let binary = dir.join("binary.arch");
    std::fs::write(&binary, [0xffu8, 0xfe, 0x00, 0x9c]).unwrap();
    let big = dir.join("big.arch");
    std::fs::write(&big, "# padding\n".repeat(120_000)).unwrap();
    let subdir = dir.join("folder.arch");
    std::fs::create_dir_all(&subdir).unwrap();
    let mut files = vec![
        (empty, "empty.arch"),
        (binary, "binary.arch"),
        (big, "big.arch"),
        (subdir, "folder.arch"),
        (PathBuf::from("/dev/zero"), "/dev/zero"),
        (PathBuf::from("/dev/null"), "/dev/null"),
    ];
    let fifo = dir.join("fifo.arch");
    if mkfifo(&fifo) {
        files.push((fifo, "fifo.arch"));
    }
    for (path, needle) in files {
        out.push(case(
            format!("arch file {needle}"),
            &["grad", "--backend", "cpu", "--model", &s(&path)],
            &[needle],
        ));
    }
    out
}

fn weights_cases(dir: &Path) -> Vec<Case> {
    let mut out = vec![];
    let grad = |name: &str, w: &Path, needles: &[&str]| {
        case(
            format!("weights {name}"),
            &[
                "grad",
                "--backend",
                "cpu",
                "--model",
                "mlp-tiny",
                "--samples",
                "4",
                "--weights",
                &s(w),
            ],
            needles,
        )
    };
    let base = mlp_weights();
    // Per tensor: wrong shape, missing, a non-float dtype, a non-finite value.
    for (i, (tname, _, shape, _)) in base.iter().enumerate() {
        let file = |tag: &str| dir.join(format!("w-{i}-{tag}.safetensors"));
        let mut t = base.clone();
        let mut bad_shape = shape.clone();
        bad_shape[0] += 1;
        let len = bad_shape.iter().product();
        t[i] = (tname.clone(), "F32".into(), bad_shape, f32s(len, 0.01));
        write_st(&file("shape"), &t);
        out.push(grad(
            &format!("{tname} misshapen"),
            &file("shape"),
            &[tname, "--weights", "shape"],
        ));
        let mut t = base.clone();
        t.remove(i);
        write_st(&file("missing"), &t);
        out.push(grad(
            &format!("{tname} missing"),
            &file("missing"),
            &[tname, "missing"],
        ));
        for dtype in ["I64", "I32", "BOOL", "U8", "I8"] {
            let mut t = base.clone();
            let n: usize = shape.iter().product();
            t[i] = (tname.clone(), dtype.into(), shape.clone(), elems(dtype, n));
            let f = file(dtype);
            write_st(&f, &t);
            out.push(grad(
                &format!("{tname} as {dtype}"),
                &f,
                &[tname, dtype, "floating point"],
            ));
        }
        for (tag, v) in [("nan", f32::NAN), ("inf", f32::INFINITY)] {
            let mut t = base.clone();
            let n: usize = shape.iter().product();
            let mut bytes = f32s(n, 0.01);
            bytes[4..8].copy_from_slice(&v.to_le_bytes());
            t[i].3 = bytes;
            write_st(&file(tag), &t);
            out.push(grad(
                &format!("{tname} {tag}"),
                &file(tag),
                &[tname, "not finite"],
            ));
        }
    }
    // Extra tensors, hostile names.
    for (i, extra) in [
        "head.weight",
        "module.fc1.weight",
        "\u{1b}]0;pwned\u{7}",
        "fc1.weight\u{1b}[2K",
        "",
    ]
    .iter()
    .enumerate()
    {
        let mut t = base.clone();
        t.push((extra.to_string(), "F32".into(), vec![2], f32s(2, 1.0)));
        let f = dir.join(format!("w-extra-{i}.safetensors"));
        write_st(&f, &t);
        out.push(grad(&format!("extra tensor {i}"), &f, &["unexpected"]));
    }
    // Truncated and corrupted files.
    let good = {
        let v: Vec<(&str, &str, Vec<usize>, Vec<u8>)> = base
            .iter()
            .map(|(n, d, s, b)| (n.as_str(), d.as_str(), s.clone(), b.clone()))
            .collect();
        st_bytes(&v)
    };
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let mut cuts = vec![
        0,
        1,
        7,
        8,
        9,
        20,
        header_len,
        header_len + 8,
        header_len + 9,
    ];
    cuts.extend((1..=8).map(|k| good.len() * k / 9));
    cuts.push(good.len() - 1);
    for (i, cut) in cuts.into_iter().enumerate() {
        let f = dir.join(format!("w-cut-{i}.safetensors"));
        std::fs::write(&f, &good[..cut]).unwrap();
        out.push(grad(&format!("truncated at {cut}"), &f, &[&s(&f)]));
    }
    let mut corrupt: Vec<(String, Vec<u8>)> = vec![];
    let mut huge = good.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    corrupt.push(("header length 2^64-1".into(), huge));
    let mut long = good.clone();
    long[..8].copy_from_slice(&(good.len() as u64 * 4).to_le_bytes());
    corrupt.push(("header length past the end".into(), long));
    let mut notjson = good.clone();
    notjson[8] = b'[';
    corrupt.push(("header not an object".into(), notjson));
    let mut garbage = good.clone();
    for b in &mut garbage[8..8 + 40] {
        *b = 0xff;
    }
    corrupt.push(("header not UTF-8".into(), garbage));
    corrupt.push(("extra trailing bytes".into(), {
        let mut g = good.clone();
        g.extend([0u8; 16]);
        g
    }));
    for (i, (what, hdr)) in [
        (
            "offsets overlap",
            r#"{"fc1.weight":{"dtype":"F32","shape":[16,36],"data_offsets":[0,2304]},"fc1.bias":{"dtype":"F32","shape":[16],"data_offsets":[0,64]}}"#,
        ),
        (
            "shape larger than data",
            r#"{"fc1.weight":{"dtype":"F32","shape":[16000000,36],"data_offsets":[0,2304]}}"#,
        ),
        (
            "shape overflows",
            r#"{"fc1.weight":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,2304]}}"#,
        ),
        (
            "unknown dtype",
            r#"{"fc1.weight":{"dtype":"Q4","shape":[16,36],"data_offsets":[0,2304]}}"#,
        ),
        (
            "negative offset",
            r#"{"fc1.weight":{"dtype":"F32","shape":[16,36],"data_offsets":[-1,2304]}}"#,
        ),
        (
            "fp8 dtype",
            r#"{"fc1.weight":{"dtype":"F8_E4M3","shape":[16,36],"data_offsets":[0,576]}}"#,
        ),
        ("metadata only", r#"{"__metadata__":{"a":"b"}}"#),
        ("empty object", r#"{}"#),
    ]
    .iter()
    .enumerate()
    {
        let mut h = hdr.as_bytes().to_vec();
        while !h.len().is_multiple_of(8) {
            h.push(b' ');
        }
        let mut b = (h.len() as u64).to_le_bytes().to_vec();
        b.extend(&h);
        let data_len = match i {
            5 => 576,
            6 | 7 => 0,
            _ => 2304,
        };
        b.extend(vec![0u8; data_len]);
        corrupt.push((what.to_string(), b));
    }
    for (i, (what, bytes)) in corrupt.into_iter().enumerate() {
        let f = dir.join(format!("w-corrupt-{i}.safetensors"));
        std::fs::write(&f, bytes).unwrap();
        out.push(grad(what.as_str(), &f, &[&s(&f)]));
    }
    // Not regular files.
    let folder = dir.join("w-folder.safetensors");
    std::fs::create_dir_all(&folder).unwrap();
    let mut specials = vec![
        (folder, "directory".to_string()),
        (PathBuf::from("/dev/zero"), "character device".into()),
        (PathBuf::from("/dev/null"), "character device".into()),
        (dir.join("nonexistent.safetensors"), "nonexistent".into()),
    ];
    let fifo = dir.join("w-fifo.safetensors");
    if mkfifo(&fifo) {
        specials.push((fifo, "FIFO".into()));
    }
    for (path, needle) in specials {
        out.push(grad(
            &format!("weights {}", s(&path)),
            &path,
            &[&s(&path), &needle],
        ));
    }
    out
}

fn vector_cases(dir: &Path) -> Vec<Case> {
    let mut out = vec![];
    let hvp = |name: &str, v: &Path, needles: &[&str]| {
        case(
            format!("vector {name}"),
            &[
                "hvp",
                "--backend",
                "cpu",
                "--model",
                "mlp-tiny",
                "--samples",
                "4",
                "--vector",
                &s(v),
            ],
            needles,
        )
    };
    let base = mlp_weights();
    let mut t = base.clone();
    t[2].3[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
    let f = dir.join("v-nan.safetensors");
    write_st(&f, &t);
    out.push(hvp("NaN", &f, &["--vector", "fc2.weight", "not finite"]));
    let mut t = base.clone();
    t.pop();
    let f = dir.join("v-missing.safetensors");
    write_st(&f, &t);
    out.push(hvp("missing", &f, &["--vector", "fc3.bias", "missing"]));
    let mut t = base.clone();
    t.push((
        "bn1.running_mean".into(),
        "F32".into(),
        vec![4],
        f32s(4, 0.0),
    ));
    let f = dir.join("v-buffer.safetensors");
    write_st(&f, &t);
    out.push(hvp("with a buffer", &f, &["--vector", "bn1.running_mean"]));
    let mut t = base.clone();
    let n: usize = t[0].2.iter().product();
    t[0] = (
        t[0].0.clone(),
        "I64".into(),
        t[0].2.clone(),
        elems("I64", n),
    );
    let f = dir.join("v-int.safetensors");
    write_st(&f, &t);
    out.push(hvp("integer", &f, &["--vector", "fc1.weight", "I64"]));
    out.push(hvp(
        "nonexistent",
        &dir.join("nope.safetensors"),
        &["--vector", "nope.safetensors"],
    ));
    let fifo = dir.join("v-fifo.safetensors");
    if mkfifo(&fifo) {
        out.push(hvp("FIFO", &fifo, &["--vector", "FIFO"]));
    }
    out.push(hvp("/dev/zero", Path::new("/dev/zero"), &["/dev/zero"]));
    out
}

fn data_cases(dir: &Path) -> Vec<Case> {
    let mut out = vec![];
    let grad = |name: &str, d: &Path, extra: &[&str], needles: &[&str]| {
        let mut args = vec![
            "grad".to_string(),
            "--backend".into(),
            "cpu".into(),
            "--model".into(),
            "mlp-tiny".into(),
            "--data".into(),
            s(d),
        ];
        args.extend(extra.iter().map(|x| x.to_string()));
        let a: Vec<&str> = args.iter().map(|x| x.as_str()).collect();
        case(format!("data {name}"), &a, needles)
    };
    let mut variants: Vec<(&str, Vec<Spec>, Vec<&str>)> = vec![];
    let n = 8;
    for dtype in ["U8", "I64", "I32", "BOOL"] {
        let mut t = mlp_data(n);
        t[0].1 = dtype.into();
        t[0].3 = elems(dtype, n * 36);
        variants.push(("x dtype", t, vec!["`x`", dtype]));
    }
    for dtype in ["F32", "F64", "BOOL", "F16"] {
        let mut t = mlp_data(n);
        t[1].1 = dtype.into();
        t[1].3 = elems(dtype, n);
        variants.push(("y dtype", t, vec!["`y`", dtype, "integer"]));
    }
    let mut t = mlp_data(n);
    t.remove(0);
    variants.push(("no x", t, vec!["missing tensor `x`"]));
    let mut t = mlp_data(n);
    t.remove(1);
    variants.push(("no y", t, vec!["missing tensor `y`"]));
    let mut t = mlp_data(n);
    t.push(("z".into(), "F32".into(), vec![1], f32s(1, 0.0)));
    variants.push(("extra", t, vec!["unexpected tensor `z`"]));
    let mut t = mlp_data(n);
    t[0].2 = vec![n, 36];
    variants.push(("x 2-D", t, vec!["[N, C, H, W]"]));
    let mut t = mlp_data(n);
    t[1].2 = vec![n / 2, 2];
    variants.push(("y 2-D", t, vec!["`y` must be [N]"]));
    let mut t = mlp_data(n);
    t[1].2 = vec![n - 1];
    t[1].3.truncate(8 * (n - 1));
    variants.push(("y short", t, vec!["`y` must be [N]"]));
    let mut t = mlp_data(n);
    t[1].3[0..8].copy_from_slice(&7i64.to_le_bytes());
    variants.push(("label 7", t, vec!["label 7", "4 classes"]));
    let mut t = mlp_data(n);
    t[1].3[8..16].copy_from_slice(&(-1i64).to_le_bytes());
    variants.push(("label -1", t, vec!["label -1"]));
    let mut t = mlp_data(n);
    t[0].3[40..44].copy_from_slice(&f32::NAN.to_le_bytes());
    variants.push(("x NaN", t, vec!["not finite"]));
    let mut t = mlp_data(n);
    t[0].2 = vec![n, 3, 2, 6];
    variants.push(("x wrong image", t, vec!["[3, 2, 6]", "[1, 6, 6]"]));
    let mut t = mlp_data(0);
    t[0].2 = vec![0, 1, 6, 6];
    variants.push(("empty", t, vec!["no samples"]));
    let mut t = mlp_data(0);
    t[0].2 = vec![0, 4294967296, 4294967296, 4294967296];
    variants.push(("empty, huge image", t, vec!["`x`"]));
    for (i, (what, t, needles)) in variants.into_iter().enumerate() {
        let f = dir.join(format!("d-{i}.safetensors"));
        write_st(&f, &t);
        let mut nd = needles.clone();
        nd.push("d-");
        out.push(grad(what, &f, &[], &nd));
    }
    // --samples above the file's size names both numbers.
    let f = dir.join("d-good.safetensors");
    write_st(&f, &mlp_data(8));
    out.push(grad(
        "samples above size",
        &f,
        &["--samples", "9"],
        &["--samples", "9", "8 samples"],
    ));
    out.push(grad(
        "samples 1e9 above size",
        &f,
        &["--samples", "1000000000"],
        &["--samples", "1000000000", "8 samples"],
    ));
    out.push(grad("samples 0", &f, &["--samples", "0"], &["--samples"]));
    let fifo = dir.join("d-fifo.safetensors");
    if mkfifo(&fifo) {
        out.push(grad("FIFO", &fifo, &[], &["--data", "FIFO"]));
    }
    // CIFAR folders.
    let record = |label: u8| {
        let mut r = vec![label];
        r.extend(std::iter::repeat_n(128u8, 3072));
        r
    };
    let cifar = |name: &str, files: &[(&str, Vec<u8>)]| -> PathBuf {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for (f, bytes) in files {
            std::fs::write(d.join(f), bytes).unwrap();
        }
        d
    };
    let r20 = |name: &str, d: &Path, extra: &[&str], needles: &[&str]| {
        let mut args = vec![
            "grad".to_string(),
            "--backend".into(),
            "cpu".into(),
            "--model".into(),
            "resnet20-nobn".into(),
            "--data".into(),
            s(d),
        ];
        args.extend(extra.iter().map(|x| x.to_string()));
        let a: Vec<&str> = args.iter().map(|x| x.as_str()).collect();
        case(format!("cifar {name}"), &a, needles)
    };
    let d = cifar(
        "c-trunc",
        &[("data_batch_1.bin", record(1)[..3000].to_vec())],
    );
    out.push(r20("truncated", &d, &[], &["data_batch_1.bin", "records"]));
    let d = cifar("c-label", &[("data_batch_1.bin", record(10))]);
    out.push(r20("label 10", &d, &[], &["data_batch_1.bin", "label 10"]));
    let d = cifar("c-empty", &[("data_batch_1.bin", vec![])]);
    out.push(r20("empty file", &d, &[], &["data_batch_1.bin"]));
    let d = cifar("c-none", &[("readme.txt", b"hi".to_vec())]);
    out.push(r20("no .bin", &d, &[], &["c-none", ".bin"]));
    let d = cifar(
        "c-two",
        &[("data_batch_1.bin", [record(1), record(2)].concat())],
    );
    out.push(r20(
        "samples above size",
        &d,
        &["--samples", "3"],
        &["--samples", "3", "2 samples"],
    ));
    let d = cifar("c-dir", &[("data_batch_1.bin", record(1))]);
    std::fs::create_dir_all(d.join("test_batch.bin")).unwrap();
    out.push(r20(
        "a folder named .bin",
        &d,
        &[],
        &["test_batch.bin", "directory"],
    ));
    let d = cifar("c-dev", &[("data_batch_1.bin", record(1))]);
    #[cfg(unix)]
    {
        let _ = std::os::unix::fs::symlink("/dev/zero", d.join("data_batch_2.bin"));
        out.push(r20(
            "/dev/zero named .bin",
            &d,
            &[],
            &["data_batch_2.bin", "device"],
        ));
    }
    let d = cifar("c-fifo", &[("data_batch_1.bin", record(1))]);
    if mkfifo(&d.join("data_batch_2.bin")) {
        out.push(r20(
            "FIFO named .bin",
            &d,
            &[],
            &["data_batch_2.bin", "FIFO"],
        ));
    }
    let d = cifar(
        "c-ctrl",
        &[("data\u{1b}[31m.bin", record(1)[..100].to_vec())],
    );
    out.push(r20(
        "control characters in a file name",
        &d,
        &[],
        &["records"],
    ));
    out
}

fn flag_cases(dir: &Path) -> Vec<Case> {
    let mut out = vec![];
    let small = [
        ("--backend", "cpu"),
        ("--model", "mlp-tiny"),
        ("--samples", "8"),
    ];
    // The small problem, minus any flag the case sets itself.
    let with = |cmd: &str, flags: &[&str], needles: &[&str]| {
        let mut a = vec![cmd];
        for (f, v) in small {
            if !flags.contains(&f) {
                a.extend([f, v]);
            }
        }
        a.extend(flags);
        case(format!("{cmd} {}", flags.join(" ")), &a, needles)
    };
    // Shared problem flags, on every compute command.
    for cmd in [
        "grad", "hvp", "density", "eigs", "trace", "exact", "layers", "bench",
    ] {
        for (flag, bad) in [
            ("--samples", "0"),
            ("--samples", "-1"),
            ("--samples", "abc"),
            ("--samples", "1e3"),
            ("--samples", "1000000000"),
            ("--batch", "0"),
            ("--batch", "-3"),
            ("--seed", "-1"),
            ("--bn", "train"),
            ("--backend", "cuda"),
            ("--adapter", "x"),
            ("--model", "resnet99"),
            ("--model", ""),
        ] {
            out.push(with(cmd, &[flag, bad], &[flag]));
        }
    }
    let per_command: Vec<(&str, Vec<(&str, &str)>)> = vec![
        (
            "density",
            vec![
                ("--steps", "0"),
                ("--steps", "-1"),
                ("--steps", "1000000000"),
                ("--runs", "0"),
                ("--runs", "1000000000"),
                ("--sigma", "0"),
                ("--sigma", "-1"),
                ("--sigma", "nan"),
                ("--sigma", "inf"),
                ("--sigma", "-inf"),
                ("--sigma", "abc"),
                ("--sigma", "1e-300"),
                ("--sigma", "1e308"),
                ("--grid", "0"),
                ("--grid", "1"),
                ("--grid", "1000000000"),
                ("--grid", "abc"),
                ("--plot", "x.png"),
                ("--layer", "nosuch"),
                ("--layer", "fc9"),
            ],
        ),
        (
            "eigs",
            vec![
                ("--top", "0"),
                ("--top", "1000000000"),
                ("--top", "abc"),
                ("--tol", "0"),
                ("--tol", "-1"),
                ("--tol", "nan"),
                ("--tol", "inf"),
                ("--tol", "1"),
                ("--steps", "0"),
                ("--which", "biggest"),
                ("--layer", "nosuch"),
            ],
        ),
        (
            "trace",
            vec![
                ("--probes", "0"),
                ("--probes", "1000000000"),
                ("--probes", "abc"),
                ("--layer", "nosuch"),
            ],
        ),
        (
            "exact",
            vec![
                ("--max-params", "0"),
                ("--max-params", "100000000"),
                ("--sigma", "0"),
                ("--sigma", "nan"),
                ("--sigma", "1e-300"),
                ("--grid", "1"),
                ("--grid", "1000000000"),
                ("--plot", "x.png"),
                ("--layer", "nosuch"),
            ],
        ),
        (
            "layers",
            vec![
                ("--steps", "0"),
                ("--runs", "0"),
                ("--sigma", "0"),
                ("--sigma", "1e-300"),
                ("--grid", "0"),
            ],
        ),
        ("bench", vec![("--reps", "0"), ("--reps", "1000000000")]),
    ];
    for (cmd, flags) in per_command {
        for (flag, bad) in flags {
            let mut f = vec![flag, bad];
            if cmd == "density" || cmd == "layers" {
                // Small runs, so cases that get to SLQ finish at once.
                if flag != "--steps" {
                    f.extend(["--steps", "4"]);
                }
                if flag != "--runs" {
                    f.extend(["--runs", "1"]);
                }
            }
            out.push(with(cmd, &f, &[flag]));
        }
    }
    // The spec's examples of sizes refused up front.
    out.push(case(
        "exact --max-params 1e8 on resnet20",
        &[
            "exact",
            "--model",
            "resnet20",
            "--samples",
            "4",
            "--max-params",
            "100000000",
        ],
        &["--max-params", "100000000", "16384"],
    ));
    out.push(case(
        "exact on resnet20",
        &["exact", "--model", "resnet20", "--samples", "4"],
        &["--max-params", "272474"],
    ));
    out.push(case(
        "density --grid 1e9",
        &["density", "--backend", "cpu", "--grid", "1000000000"],
        &["--grid", "1000000000", "1000000"],
    ));
    out.push(case(
        "grad --samples 1e9 synthetic",
        &["grad", "--backend", "cpu", "--samples", "1000000000"],
        &["--samples", "1000000000", "1073741824"],
    ));
    out.push(case(
        "trace --layerwise --layer",
        &["trace", "--backend", "cpu", "--layerwise", "--layer", "fc"],
        &["--layerwise", "--layer"],
    ));
    out.push(case(
        "a layer name with control characters",
        &[
            "density",
            "--backend",
            "cpu",
            "--model",
            "mlp-tiny",
            "--layer",
            "\u{1b}[2Jfc",
        ],
        &["--layer"],
    ));
    out.push(case("no subcommand", &[], &["Usage"]));
    out.push(case("unknown subcommand", &["spectrum"], &["spectrum"]));
    out.push(case(
        "unknown flag",
        &["density", "--backend", "cpu", "--stepz", "3"],
        &["--stepz"],
    ));
    out.push(case(
        "adapter out of range",
        &[
            "grad",
            "--backend",
            "vulkan",
            "--adapter",
            "99",
            "--samples",
            "4",
        ],
        &["--adapter"],
    ));
    out.push(case(
        "weights nonexistent",
        &[
            "grad",
            "--backend",
            "cpu",
            "--weights",
            "/nonexistent/w.safetensors",
        ],
        &["--weights", "/nonexistent/w.safetensors"],
    ));
    out.push(case(
        "data nonexistent",
        &["grad", "--backend", "cpu", "--data", "/nonexistent/d"],
        &["--data", "/nonexistent/d"],
    ));
    // Outputs that cannot be written.
    for cmd in ["grad", "hvp", "init", "synth"] {
        let mut a = vec![
            cmd,
            "--backend",
            "cpu",
            "--model",
            "mlp-tiny",
            "--samples",
            "4",
        ];
        a.extend(["--out", "/nonexistent/dir/o.safetensors"]);
        out.push(case(
            format!("{cmd} --out unwritable"),
            &a,
            &["/nonexistent/dir/o.safetensors"],
        ));
    }
    // Outputs checked before the computation: a folder given as the file,
    // a missing folder, for every command that writes one.
    for (cmd, flag, extra) in [
        ("density", "--plot", vec!["--steps", "4", "--runs", "1"]),
        ("exact", "--plot", vec![]),
        ("eigs", "--vectors", vec!["--top", "1"]),
        ("trace", "--out", vec!["--probes", "2"]),
        ("layers", "--out", vec!["--steps", "3", "--runs", "1"]),
    ] {
        let missing = dir.join("no-such-folder").join("o.x");
        let mut a = extra.clone();
        a.extend([flag, dir.to_str().unwrap()]);
        out.push(with(cmd, &a, &[flag, "a folder"]));
        let mut a = extra;
        let m = s(&missing);
        a.extend([flag, m.as_str()]);
        out.push(with(cmd, &a, &[flag, "no-such-folder", "does not exist"]));
    }
    let json_out = dir.join("no-such-dir").join("d.json");
    out.push(with(
        "density",
        &["--steps", "4", "--runs", "1", "--out", &s(&json_out)],
        &["no-such-dir"],
    ));
    // stdout closed by its reader, or full.
    for (cmd, extra) in [
        ("density", vec!["--steps", "4", "--runs", "1", "--json"]),
        ("density", vec!["--steps", "4", "--runs", "1"]),
        ("grad", vec!["--json"]),
        ("layers", vec!["--steps", "3", "--runs", "1", "--json"]),
    ] {
        let mut c = with(cmd, &extra, &[]);
        c.name = format!("{} (stdout closed)", c.name);
        c.expect = Expect::Quiet;
        c.stdout = Out::Closed;
        out.push(c);
        let mut c = with(cmd, &extra, &["stdout"]);
        c.name = format!("{} > /dev/full", c.name);
        c.stdout = Out::Full;
        out.push(c);
    }
    let mut c = case(
        "devices --json (stdout closed)",
        &["devices", "--json"],
        &[],
    );
    c.expect = Expect::Quiet;
    c.stdout = Out::Closed;
    out.push(c);
    out
}

/// Leftovers of the previous battery: a header whose byte range does not
/// match a tensor's shape names the tensor; a CIFAR .bin given as --data;
/// a missing .arch file; `all` inside a list of modules; a non-finite Hv.
fn leftover_cases(dir: &Path) -> Vec<Case> {
    let mut out = vec![];
    // fc2.bias's range is 4 bytes short of its shape; then fc1.weight's
    // data offsets overlap fc1.bias's... each error names the tensor.
    let mut t = mlp_weights();
    let i = t.iter().position(|x| x.0 == "fc2.bias").unwrap();
    let short = t[i].3.len() - 4;
    t[i].3.truncate(short);
    let specs: Vec<(&str, &str, Vec<usize>, Vec<u8>)> = t
        .iter()
        .map(|(n, d, sh, b)| (n.as_str(), d.as_str(), sh.clone(), b.clone()))
        .collect();
    let f = dir.join("short-range.safetensors");
    std::fs::write(&f, st_bytes(&specs)).unwrap();
    out.push(case(
        "weights with a short byte range",
        &[
            "grad",
            "--backend",
            "cpu",
            "--model",
            "mlp-tiny",
            "--samples",
            "4",
            "--weights",
            &s(&f),
        ],
        &["short-range.safetensors", "fc2.bias", "data_offsets"],
    ));
    // A CIFAR batch file alone.
    let bin = dir.join("data_batch_1.bin");
    std::fs::write(&bin, vec![0u8; 3073 * 2]).unwrap();
    out.push(case(
        "a CIFAR .bin as --data",
        &["grad", "--backend", "cpu", "--data", &s(&bin)],
        &["data_batch_1.bin", "folder"],
    ));
    // A missing architecture file is a missing file.
    let missing = dir.join("nosuch.arch");
    out.push(case(
        "a missing .arch",
        &["grad", "--backend", "cpu", "--model", &s(&missing)],
        &["--model", "nosuch.arch", "No such file"],
    ));
    out.push(case(
        "a missing arch in a folder",
        &["grad", "--backend", "cpu", "--model", "/nonexistent/m"],
        &["--model", "/nonexistent/m", "No such file"],
    ));
    // A float64 reference beyond the host's memory is refused before any
    // work, with the sizes (3 float64s per value: 512 channels of 512²
    // values per sample in 2 layers, 64 samples: ~400 GiB; the data set
    // itself is 64 MiB), not aborted by a failed allocation.
    let huge = dir.join("huge-activations.arch");
    std::fs::write(
        &huge,
        "model huge\ninput 1 512 512\nclasses 2\nconv c1 512 k=3 pad=1\nrelu\ngap\nlinear fc 2\n",
    )
    .unwrap();
    for cmd in ["hvp", "density", "train"] {
        let out_dir = dir.join(format!("huge-{cmd}"));
        let mut a = vec![
            cmd,
            "--backend",
            "cpu",
            "--model",
            huge.to_str().unwrap(),
            "--samples",
            "64",
            "--batch",
            "64",
        ];
        if cmd == "train" {
            a.extend([
                "--epochs",
                "1",
                "--lr",
                "0.1",
                "--out",
                out_dir.to_str().unwrap(),
            ]);
        }
        out.push(case(
            format!("{cmd}: a float64 reference larger than the host's memory"),
            &a,
            &["host memory", "GiB", "available", "`huge`"],
        ));
    }
    // `all` and `middle` stand alone.
    for spec in ["all,middle", "fc1,all", "middle,fc2"] {
        out.push(case(
            format!("--layer {spec}"),
            &[
                "density",
                "--backend",
                "cpu",
                "--model",
                "mlp-tiny",
                "--samples",
                "4",
                "--layer",
                spec,
            ],
            &["--layer", "stands alone"],
        ));
    }
    // Weights so large that Hv overflows float64: an error, not a null.
    let big: Vec<Spec> = mlp_weights()
        .into_iter()
        .map(|(n, _, sh, b)| {
            let k = b.len() / 4;
            (
                n,
                "F64".to_string(),
                sh,
                (0..k).flat_map(|_| 1e120f64.to_le_bytes()).collect(),
            )
        })
        .collect();
    let f = dir.join("huge.safetensors");
    write_st(&f, &big);
    // A direction of 1e300s: Hv or vᵀHv overflows; an error, not a null.
    let v: Vec<Spec> = mlp_params()
        .into_iter()
        .map(|(n, sh)| {
            let k: usize = sh.iter().product();
            (
                n,
                "F64".to_string(),
                sh,
                (0..k).flat_map(|_| 1e300f64.to_le_bytes()).collect(),
            )
        })
        .collect();
    let vf = dir.join("huge-v.safetensors");
    write_st(&vf, &v);
    out.push(case(
        "hvp along a direction of 1e300",
        &[
            "hvp",
            "--backend",
            "cpu",
            "--model",
            "mlp-tiny",
            "--samples",
            "4",
            "--vector",
            &s(&vf),
            "--json",
        ],
        &["overflow"],
    ));
    out.push(case(
        "hvp on weights of 1e120",
        &[
            "hvp",
            "--backend",
            "cpu",
            "--model",
            "mlp-tiny",
            "--samples",
            "4",
            "--weights",
            &s(&f),
            "--json",
        ],
        &["NaN", "overflow"],
    ));
    out
}

/// `hesscope train`: divergence (on the reference, Vulkan and GL), flags
/// checked whether or not their feature is on, folders holding another
/// run, and a stdout that goes away.
fn train_cases(dir: &Path) -> Vec<Case> {
    let mut out = vec![];
    let mut n = 0;
    let mut fresh = || {
        n += 1;
        s(&dir.join(format!("train-{n}")))
    };
    let base = |o: String, flags: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "train",
            "--model",
            "cnn-tiny",
            "--samples",
            "64",
            "--batch",
            "16",
            "--epochs",
            "3",
            "--lr",
            "0.05",
            "--out",
        ]
        .map(String::from)
        .to_vec();
        a.push(o);
        // A flag given replaces the default one.
        let mut i = 0;
        while i < flags.len() {
            match a.iter().position(|x| x == flags[i]) {
                Some(p) if i + 1 < flags.len() && !flags[i + 1].starts_with("--") => {
                    a[p + 1] = flags[i + 1].into();
                    i += 2;
                }
                _ => {
                    a.push(flags[i].into());
                    i += 1;
                }
            }
        }
        if !a.iter().any(|x| x == "--backend") {
            a.extend(["--backend".into(), "cpu".into()]);
        }
        a
    };
    let mut push = |name: String, a: Vec<String>, needles: &[&str]| {
        let refs: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
        out.push(case(name, &refs, needles));
    };
    // Divergence: named with its epoch and step, no checkpoint, exit 1.
    for backend in ["cpu", "vulkan", "gl"] {
        for flags in [
            vec!["--lr", "1e6"],
            vec!["--lr", "1e50"],
            vec!["--lr", "1e150"],
            vec!["--lr", "1e3"],
            vec!["--weight-decay", "1e10"],
        ] {
            let mut f = flags.clone();
            f.extend(["--backend", backend]);
            push(
                format!("train {} on {backend}", flags.join(" ")),
                base(fresh(), &f),
                &["diverged in epoch", ", step", "last good checkpoint"],
            );
        }
    }
    push(
        "train --htr-gamma 1e30".into(),
        base(fresh(), &["--htr-gamma", "1e30", "--samples", "16"]),
        &["epoch 1", "step 1", "last good checkpoint"],
    );
    // Flags checked without their feature.
    for (flags, needle) in [
        (vec!["--steps", "0"], "--steps"),
        (vec!["--probes", "0"], "--probes"),
        (vec!["--block", "0"], "--block"),
        (vec!["--runs", "0"], "--runs"),
        (vec!["--grid", "1"], "--grid"),
        (vec!["--tol", "2"], "--tol"),
        (vec!["--sigma", "-1"], "--sigma"),
        (vec!["--htr-probes", "0"], "--htr-probes"),
        (vec!["--htr-every", "0"], "--htr-every"),
        (vec!["--htr-layers", "nosuch"], "--htr-layers"),
        (vec!["--htr-from-epoch", "5"], "--htr-from-epoch"),
        (vec!["--htr-from-epoch", "3"], "--htr-from-epoch"),
        (vec!["--cache-budget", "NaN"], "--cache-budget"),
        (vec!["--cache-budget", "-1"], "--cache-budget"),
        (
            vec!["--overwrite", "--resume", "/nonexistent/r"],
            "--overwrite",
        ),
        (vec!["--resume", "/nonexistent/r"], "--resume"),
    ] {
        push(
            format!("train {}", flags.join(" ")),
            base(fresh(), &flags),
            &[needle],
        );
    }
    // crop-flip on images a crop can miss: 1×1 (a flat input) and 4×4.
    for (name, input) in [("flat", "36 1 1"), ("small", "1 4 4")] {
        let arch = dir.join(format!("{name}.arch"));
        std::fs::write(
            &arch,
            format!("model {name}\ninput {input}\nclasses 4\nflatten\nlinear fc 4\n"),
        )
        .unwrap();
        push(
            format!("train --augment crop-flip on {input}"),
            base(fresh(), &["--augment", "crop-flip", "--model", &s(&arch)]),
            &["--augment", "crop-flip"],
        );
    }
    // A folder holding another run's checkpoint.
    let old = dir.join("old-run");
    std::fs::create_dir_all(old.join("checkpoints")).unwrap();
    std::fs::write(old.join("checkpoints/epoch-1.json"), "{}").unwrap();
    push(
        "train into another run's folder".into(),
        base(s(&old), &[]),
        &["--out", "another run", "--overwrite", "--resume"],
    );
    // stdout closed: the run goes on and ends with 0; /dev/full: 1.
    let mut c = case("x", &[], &[]);
    let a = base(fresh(), &[]);
    c.args = a;
    c.name = "train (stdout closed)".into();
    c.expect = Expect::Quiet;
    c.stdout = Out::Closed;
    out.push(c);
    let mut c = case("train > /dev/full", &[], &["stdout"]);
    c.args = base(fresh(), &[]);
    c.stdout = Out::Full;
    out.push(c);
    out
}

#[test]
fn crafted_bad_input_ends_in_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut cases = vec![];
    cases.extend(arch_cases(dir.path()));
    cases.extend(weights_cases(dir.path()));
    cases.extend(vector_cases(dir.path()));
    cases.extend(data_cases(dir.path()));
    cases.extend(flag_cases(dir.path()));
    cases.extend(train_cases(dir.path()));
    cases.extend(leftover_cases(dir.path()));
    assert!(cases.len() >= 300, "only {} cases", cases.len());
    check_all(cases);
}

#[test]
fn runs_1_reports_an_unknown_standard_error_not_zero() {
    let out = Command::new(env!("CARGO_BIN_EXE_hesscope"))
        .args([
            "density",
            "--backend",
            "cpu",
            "--model",
            "mlp-tiny",
            "--samples",
            "8",
            "--steps",
            "5",
            "--runs",
            "1",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(j["trace_stderr"].is_null(), "{}", j["trace_stderr"]);
    let out = Command::new(env!("CARGO_BIN_EXE_hesscope"))
        .args([
            "density",
            "--backend",
            "cpu",
            "--model",
            "mlp-tiny",
            "--samples",
            "8",
            "--steps",
            "5",
            "--runs",
            "1",
        ])
        .output()
        .unwrap();
    let prose = String::from_utf8_lossy(&out.stdout);
    assert!(prose.contains("± unknown"), "{prose}");
}
