//! The fixed palette of named colours, and nearest-colour classification.
//!
//! The colours are chosen to stay far apart in RGB (the closest pair, orange and
//! yellow, is ~90 apart), so that the judge can name the colour of any pixel of a
//! rendered or generated image by its nearest palette entry.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A named colour of the shapes world. The order of [`Colour::ALL`] is part of
/// the tokenizer's fixed vocabulary order; append, never reorder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Colour {
    Red,
    Green,
    Blue,
    Yellow,
    White,
    Black,
    Orange,
    Purple,
}

impl Colour {
    pub const ALL: [Colour; 8] = [
        Colour::Red,
        Colour::Green,
        Colour::Blue,
        Colour::Yellow,
        Colour::White,
        Colour::Black,
        Colour::Orange,
        Colour::Purple,
    ];

    /// The word used for this colour in captions.
    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
            Colour::White => "white",
            Colour::Black => "black",
            Colour::Orange => "orange",
            Colour::Purple => "purple",
        }
    }

    pub fn from_name(word: &str) -> Option<Colour> {
        Colour::ALL.into_iter().find(|c| c.name() == word)
    }

    /// The exact RGB value the world paints with.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 30, 30],
            Colour::Green => [30, 170, 50],
            Colour::Blue => [30, 70, 220],
            Colour::Yellow => [245, 220, 30],
            Colour::White => [245, 245, 245],
            Colour::Black => [15, 15, 15],
            Colour::Orange => [245, 130, 20],
            Colour::Purple => [140, 50, 180],
        }
    }

    /// The palette colour closest to `rgb` (Euclidean RGB distance), with that distance.
    pub fn nearest(rgb: [u8; 3]) -> (Colour, f32) {
        Colour::ALL
            .into_iter()
            .map(|c| (c, rgb_distance(rgb, c.rgb())))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .expect("the palette is not empty")
    }
}

impl fmt::Display for Colour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

pub fn rgb_distance(a: [u8; 3], b: [u8; 3]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(&x, y)| (x as f32 - y as f32).powi(2))
        .sum::<f32>()
        .sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn palette_is_well_separated() {
        for a in Colour::ALL {
            for b in Colour::ALL {
                if a != b {
                    assert!(rgb_distance(a.rgb(), b.rgb()) > 80.0, "{a} vs {b}");
                }
            }
            assert_eq!(Colour::nearest(a.rgb()).0, a);
            assert_eq!(Colour::from_name(a.name()), Some(a));
        }
    }
}
