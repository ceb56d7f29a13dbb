//! mlx-native-lm: the model engine built on mlx-native.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
