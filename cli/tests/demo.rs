//! The README's main command must keep working: the demo runs a center and
//! two laptops over real QUIC on loopback and fails unless all three end
//! with identical heads.

#[test]
fn the_demo_story_converges_on_all_three_nodes() {
    fieldcase_cli::run_demo().expect("demo converges");
}
