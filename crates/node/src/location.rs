//! A point on the globe: where an edge stands, where a client network is.

use serde::{Deserialize, Serialize};

/// A point on the globe, degrees. The one lat/lon type of the project: edges'
/// `location`, geo's `[[networks]]`, the database's cities and the cluster view.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeoPoint {
    /// Latitude, −90..=90.
    pub lat: f64,
    /// Longitude, −180..=180.
    pub lon: f64,
}

impl GeoPoint {
    /// Problems with this point, each naming `key.lat` or `key.lon`.
    pub fn problems(&self, key: &str) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.lat.is_finite() || !(-90.0..=90.0).contains(&self.lat) {
            problems.push(format!("{key}.lat: {} is not within -90..90", self.lat));
        }
        if !self.lon.is_finite() || !(-180.0..=180.0).contains(&self.lon) {
            problems.push(format!("{key}.lon: {} is not within -180..180", self.lon));
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds() {
        assert!(GeoPoint { lat: 90.0, lon: -180.0 }.problems("location").is_empty());
        assert_eq!(GeoPoint { lat: 91.0, lon: 0.0 }.problems("location"), ["location.lat: 91 is not within -90..90"]);
        assert_eq!(GeoPoint { lat: f64::NAN, lon: 181.0 }.problems("x").len(), 2);
    }
}
