//! Error bands of an SLQ density and standard errors of its moments, from
//! the spread over its independent runs.
//!
//! The density is the mean of the runs' densities, p̄(t) = (1/R) Σ_r p_r(t)
//! (`slq::density_on`), and the runs are independent (independent Gaussian
//! starts), so the band is the standard error of that mean at every grid
//! point: SE(t) = s(t)/√R with s(t) the sample standard deviation (R − 1 in
//! the denominator) of the p_r(t). Not a bootstrap: with R ≈ 10 runs a
//! bootstrap over runs would add its own resampling noise to the same
//! plug-in variance (it converges to s(t)·√((R−1)/R)/√R), and the standard
//! error is deterministic given the runs. The plot shades ±2 SE.
//!
//! A ratio of sums over runs (the negative mass Σ_r N_r / Σ_r A_r) gets the
//! ratio estimator's standard error (the delta method):
//! SE = √(Σ_r (N_r − ρ A_r)² / (R (R − 1))) / Ā with ρ the ratio.

pub use crate::spectral::slq::ratio_stderr;
use crate::spectral::slq::SlqRun;

/// What the band is, for reports.
pub const BAND_METHOD: &str =
    "standard error of the mean over runs: s(t)/sqrt(R), s(t) the sample \
     standard deviation (R-1) of the R runs' densities at t; the plot shades +-2 SE";

/// One run's density at every grid point (unnormalised, as `density_on`
/// with a single run).
fn run_density(run: &SlqRun, grid: &[f64], sigma: f64) -> Vec<f64> {
    let c = 1.0 / (sigma * (2.0 * std::f64::consts::PI).sqrt());
    grid.iter()
        .map(|&t| {
            run.nodes
                .iter()
                .zip(&run.weights)
                .map(|(l, w)| w * (-(t - l) * (t - l) / (2.0 * sigma * sigma)).exp())
                .sum::<f64>()
                * c
        })
        .collect()
}

/// The standard error of the mean density over `runs` at every grid point
/// (same units as `slq::density_on`); `None` with fewer than two runs (one
/// run says nothing about the spread: unknown, not zero).
pub fn density_stderr(runs: &[SlqRun], grid: &[f64], sigma: f64) -> Option<Vec<f64>> {
    let r = runs.len();
    if r < 2 {
        return None;
    }
    let per: Vec<Vec<f64>> = runs.iter().map(|x| run_density(x, grid, sigma)).collect();
    let k = r as f64;
    Some(
        (0..grid.len())
            .map(|i| {
                let mean = per.iter().map(|p| p[i]).sum::<f64>() / k;
                let var = per.iter().map(|p| (p[i] - mean).powi(2)).sum::<f64>() / (k - 1.0);
                (var / k).sqrt()
            })
            .collect(),
    )
}

/// The standard error of the mean of `xs`; NaN with fewer than two.
pub fn mean_stderr(xs: &[f64]) -> f64 {
    let k = xs.len() as f64;
    if xs.len() < 2 {
        return f64::NAN;
    }
    let m = xs.iter().sum::<f64>() / k;
    let var = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (k - 1.0);
    (var / k).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The band of two runs by hand: densities a and b at a point give
    /// mean (a+b)/2, s² = (a−b)²/2, SE = |a−b|/2; one run gives none.
    #[test]
    fn the_band_of_two_runs_is_half_their_difference() {
        let r1 = SlqRun {
            nodes: vec![0.0],
            weights: vec![1.0],
            breakdowns: 0,
        };
        let r2 = SlqRun {
            nodes: vec![1.0],
            weights: vec![1.0],
            breakdowns: 0,
        };
        let grid = [0.0, 0.5, 2.0];
        let a = run_density(&r1, &grid, 0.7);
        let b = run_density(&r2, &grid, 0.7);
        let se = density_stderr(&[r1.clone(), r2], &grid, 0.7).unwrap();
        for i in 0..3 {
            assert!((se[i] - (a[i] - b[i]).abs() / 2.0).abs() <= 1e-15, "{i}");
        }
        assert!(se[1] <= 1e-15, "symmetric point: equal densities");
        assert!(density_stderr(&[r1], &grid, 0.7).is_none());
    }

    /// The ratio's error: exact ratios in every run give 0; otherwise the
    /// delta method's formula, checked against a direct evaluation.
    #[test]
    fn ratio_stderr_is_the_delta_method() {
        assert_eq!(ratio_stderr(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.0]), 0.0);
        let (n, d) = ([1.0, 0.0, 2.0], [2.0, 2.0, 2.0]);
        // ρ = 0.5, residuals 0, −1, 1: s² = 1, SE = √(1/3)/2.
        let want = (1.0f64 / 3.0).sqrt() / 2.0;
        assert!((ratio_stderr(&n, &d) - want).abs() <= 1e-15);
        assert!(ratio_stderr(&[1.0], &[2.0]).is_nan());
    }
}
