//! What the host machine offers: its available memory, from which the
//! default budgets of host-side buffers (Lanczos bases; a CPU emulator's
//! "device" memory) are derived.

/// Bytes of memory the host can still give out without swapping
/// (`MemAvailable` of /proc/meminfo), or None where that cannot be read
/// (not Linux, or a restricted /proc).
pub fn available_memory() -> Option<usize> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available(&meminfo)
}

/// Bytes for messages: GiB, MiB or KiB, whichever reads best.
pub fn bytes_text(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.2} MiB", b / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

fn parse_mem_available(meminfo: &str) -> Option<usize> {
    meminfo
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<usize>().ok())
        .map(|kib| kib.saturating_mul(1024))
}

/// The host's cores, as the standard library counts them (1 if unknown).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Sets the float64 CPU engine's parallelism for the process: rayon's
/// global pool (its per-sample and per-block work) and faer's global
/// parallelism (its own products: Par::Seq for one thread) to `threads`
/// threads, or to all cores for None. Returns the count set. Refused for
/// 0, and once rayon's pool is running with another count (it is built
/// once per process: call this before any parallel work).
pub fn set_threads(threads: Option<usize>) -> crate::Result<usize> {
    let n = threads.unwrap_or_else(cores);
    if n == 0 {
        return Err(crate::Error::Invalid {
            what: "thread count",
            msg: "0 threads; at least 1".to_string(),
        });
    }
    let built = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
    if built.is_err() && rayon::current_num_threads() != n {
        return Err(crate::Error::Invalid {
            what: "thread count",
            msg: format!(
                "{n}: the process's thread pool already runs {} threads",
                rayon::current_num_threads()
            ),
        });
    }
    faer::set_global_parallelism(match std::num::NonZeroUsize::new(n) {
        Some(k) if n > 1 => faer::Par::Rayon(k),
        _ => faer::Par::Seq,
    });
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mem_available_in_kib() {
        let m = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(parse_mem_available(m), Some(2048 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 5 kB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: lots kB\n"), None);
    }
}
