fn main() {
    println!("ril-pipe");
}
