//! How errors reach the user: the library names an input in its own words
//! (`Error::Invalid { what: "batch size", .. }`); this is the one place
//! that says which flag sets it.

use crate::cli::output::BrokenPipe;
use hesscope::error::escape;
use hesscope::Error;

/// `what` of [`Error::Invalid`] → the flag that sets it.
pub const FLAGS: &[(&str, &str)] = &[
    ("batch size", "--batch"),
    ("direction v", "--vector"),
    ("weights", "--weights"),
    ("adapter index", "--adapter"),
    ("samples", "--samples"),
    ("layer", "--layer"),
    ("Lanczos steps", "--steps"),
    ("SLQ runs", "--runs"),
    ("eigenpair count", "--top"),
    ("tolerance", "--tol"),
    ("trace probes", "--probes"),
    ("block size", "--block"),
    ("basis budget", "--basis-budget"),
    ("device basis budget", "--basis-budget"),
    ("probe", "--probe"),
    ("exact size limit", "--max-params"),
    ("kernel width", "--sigma"),
    ("grid points", "--grid"),
    ("repetitions", "--reps"),
    ("backend", "--backend"),
    ("model", "--model"),
    ("data", "--data"),
    ("epochs", "--epochs"),
    ("learning rate", "--lr"),
    ("momentum", "--momentum"),
    ("weight decay", "--weight-decay"),
    ("learning-rate gamma", "--lr-gamma"),
    ("milestones", "--milestones"),
    ("resume", "--resume"),
    ("test data", "--test-data"),
    ("htr gamma", "--htr-gamma"),
    ("htr probes", "--htr-probes"),
    ("htr every", "--htr-every"),
    ("fixtures folder", "--fixtures"),
    ("augment", "--augment"),
    ("thread count", "--threads"),
];

/// The flag for a library input name, if the CLI has one.
pub fn flag_for(what: &str) -> Option<&'static str> {
    FLAGS.iter().find(|(w, _)| *w == what).map(|(_, f)| *f)
}

/// One error of the chain as the user reads it: library `Invalid` errors
/// worded with their flag.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    if let Some(Error::Invalid { what, msg }) = e.downcast_ref::<Error>() {
        return match flag_for(what) {
            Some(flag) => format!("invalid {flag}: {msg}"),
            None => format!("invalid {what}: {msg}"),
        };
    }
    e.to_string()
}

/// The whole error as one message: the context chain joined by ": " (a
/// cause whose text the previous one already ends with is not repeated),
/// every terminal control character escaped (newlines kept).
pub fn render(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = vec![];
    for cause in e.chain() {
        let text = describe(cause);
        if parts.last().is_some_and(|p| p.ends_with(&text)) {
            continue;
        }
        parts.push(text);
    }
    parts
        .join(": ")
        .split('\n')
        .map(escape)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether the command stopped because stdout's reader went away.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<BrokenPipe>().is_some())
}
