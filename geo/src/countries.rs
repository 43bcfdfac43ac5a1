//! Where a country's (or continent's) users are, for databases that only know the
//! country: rough population centres, which is what nearest-edge choice cares
//! about (the United States' is in Missouri, Russia's near Moscow).

use cdn_node::location::GeoPoint;

/// ISO 3166-1 alpha-2 code → population centre, degrees.
const COUNTRIES: &[(&str, f64, f64)] = &[
    // Americas
    ("US", 37.4, -92.2),
    ("CA", 45.4, -75.7),
    ("MX", 19.4, -99.1),
    ("BR", -22.0, -47.0),
    ("AR", -34.6, -58.4),
    ("CL", -33.4, -70.6),
    ("CO", 4.7, -74.1),
    ("PE", -12.0, -77.0),
    ("VE", 10.5, -66.9),
    // Europe
    ("GB", 52.5, -1.5),
    ("IE", 53.3, -6.3),
    ("FR", 46.6, 2.4),
    ("DE", 51.0, 10.0),
    ("NL", 52.2, 5.3),
    ("BE", 50.8, 4.4),
    ("LU", 49.8, 6.1),
    ("CH", 46.8, 8.2),
    ("AT", 47.6, 14.1),
    ("IT", 42.8, 12.5),
    ("ES", 40.2, -3.7),
    ("PT", 39.6, -8.0),
    ("DK", 55.9, 10.0),
    ("NO", 60.0, 10.0),
    ("SE", 59.0, 15.5),
    ("FI", 61.5, 25.0),
    ("PL", 52.0, 19.4),
    ("CZ", 49.8, 15.5),
    ("SK", 48.7, 19.7),
    ("HU", 47.2, 19.4),
    ("RO", 45.9, 24.9),
    ("BG", 42.7, 25.5),
    ("GR", 38.5, 23.0),
    ("UA", 49.0, 31.4),
    ("BY", 53.7, 27.9),
    ("RU", 55.7, 37.6),
    ("TR", 39.5, 31.0),
    // Middle East and Africa
    ("IL", 31.5, 34.9),
    ("SA", 24.0, 45.0),
    ("AE", 24.5, 54.4),
    ("QA", 25.3, 51.2),
    ("IR", 33.0, 53.0),
    ("IQ", 33.3, 44.4),
    ("EG", 30.0, 31.2),
    ("MA", 33.0, -7.0),
    ("DZ", 36.0, 3.0),
    ("NG", 9.1, 7.5),
    ("GH", 5.6, -0.2),
    ("ET", 9.0, 38.7),
    ("KE", -1.3, 36.8),
    ("ZA", -26.2, 28.0),
    // Asia and Oceania
    ("IN", 22.0, 79.0),
    ("PK", 30.4, 69.3),
    ("BD", 23.7, 90.4),
    ("LK", 7.9, 80.7),
    ("CN", 32.0, 113.0),
    ("HK", 22.3, 114.2),
    ("TW", 23.7, 121.0),
    ("JP", 36.0, 138.0),
    ("KR", 37.5, 127.0),
    ("SG", 1.35, 103.8),
    ("MY", 3.1, 101.7),
    ("TH", 13.75, 100.5),
    ("VN", 16.0, 107.0),
    ("ID", -7.0, 110.0),
    ("PH", 14.6, 121.0),
    ("AU", -33.0, 148.0),
    ("NZ", -39.0, 175.0),
];

/// Continent code (as in GeoIP databases) → rough centre of its users.
const CONTINENTS: &[(&str, f64, f64)] = &[
    ("AF", 2.0, 21.0),
    ("AN", -80.0, 0.0),
    ("AS", 30.0, 100.0),
    ("EU", 50.0, 10.0),
    ("NA", 40.0, -95.0),
    ("OC", -25.0, 135.0),
    ("SA", -15.0, -60.0),
];

fn find(table: &[(&str, f64, f64)], code: &str) -> Option<GeoPoint> {
    table.iter().find(|(c, _, _)| c.eq_ignore_ascii_case(code)).map(|&(_, lat, lon)| GeoPoint { lat, lon })
}

/// The population centre of the country with ISO code `code`.
pub(crate) fn country(code: &str) -> Option<GeoPoint> {
    find(COUNTRIES, code)
}

/// The centre of the continent with code `code`.
pub(crate) fn continent(code: &str) -> Option<GeoPoint> {
    find(CONTINENTS, code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups() {
        assert!(COUNTRIES.len() >= 30);
        assert_eq!(country("de"), Some(GeoPoint { lat: 51.0, lon: 10.0 }));
        assert_eq!(country("XX"), None);
        assert_eq!(continent("EU").map(|p| p.lat), Some(50.0));
        for (code, lat, lon) in COUNTRIES.iter().chain(CONTINENTS) {
            assert!((-90.0..=90.0).contains(lat) && (-180.0..=180.0).contains(lon), "{code}");
        }
        let mut codes: Vec<_> = COUNTRIES.iter().map(|(c, _, _)| c).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), COUNTRIES.len());
    }
}
