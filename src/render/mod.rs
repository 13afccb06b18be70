//! Everything between tensors and pixels: converting image batches to and from
//! model tensors, labelled sample grids for humans, and the bitmap font those
//! labels are drawn with.

pub mod ansi;
pub mod font;
pub mod grid;
pub mod plot;
pub mod tensor;

pub use grid::{labelled_grid, save_png};
pub use plot::reward_curve;
pub use tensor::{images_to_tensor, tensor_to_images};
